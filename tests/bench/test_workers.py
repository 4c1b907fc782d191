"""The process pool's workers die with the process that started it, a SIGKILL included."""

import os
import signal
import subprocess
import sys
import time

import pytest

from chimera.bench.workers import pid_alive

# Runs two never-ending jobs on a pool of two workers; each appends its pid to a file every
# 50 ms (for at most 60 s, so a broken guard cannot leave them for long). With
# "--watchdog-only" the workers skip PR_SET_PDEATHSIG, leaving the watchdog thread alone.
DRIVER = """
import os
import sys
import time

from chimera.bench import workers


def tick(path, job):
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {job}\\n")
        time.sleep(0.05)


if "--watchdog-only" in sys.argv:  # also runs in each spawned worker (sys.argv is passed on)
    workers._die_with_parent = lambda: None

if __name__ == "__main__":
    workers.run_calls([(tick, (sys.argv[1], job)) for job in range(2)], workers=2,
                      progress=False)
"""


def _worker_pids(path):
    text = path.read_text() if path.exists() else ""
    return {int(line.split()[0]) for line in text.splitlines() if line.strip()}


@pytest.mark.parametrize("mode", ["pdeathsig", "--watchdog-only"])
def test_workers_die_when_the_parent_is_killed(tmp_path, mode):
    script, log = tmp_path / "driver.py", tmp_path / "ticks.log"
    script.write_text(DRIVER, encoding="utf-8")
    parent = subprocess.Popen([sys.executable, str(script), str(log), mode])
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
            pids = _worker_pids(log)
        assert len(pids) == 2 and parent.pid not in pids, "the pool never started"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while any(map(pid_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(pid_alive, pids)), "a worker outlived its parent by 5 s"
        size = log.stat().st_size
        time.sleep(1.0)
        assert log.stat().st_size == size  # no worker writes any more
    finally:
        for pid in pids:  # only if the guard failed: end the orphans this test started
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_pid_alive():
    assert pid_alive(os.getpid())
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert not pid_alive(done.pid)  # exited and reaped
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_alive(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(zombie.pid)  # exited, not yet reaped
    assert os.waitpid(zombie.pid, os.WNOHANG)[0] == zombie.pid
