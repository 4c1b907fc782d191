"""The output-folder lock: one writer per folder of runs, refusal naming the holder, --wait, and
takeover of a lock whose holder was killed."""

import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import pytest

from chimera.bench.lock import HOLDER_NAME, folder_lock, read_holder
from chimera.bench.suite.execute import run_sweep
from chimera.run.records import read_records

SUITE = """
name = "tiny"
task = "digits"
model = "mlp"
optimizer = "adamw"
seeds = [0, 1]
epochs = 2
batch_size = 64
"""

# Holds the folder's lock, says "held", then on a line of stdin runs the sweep (if one is given)
# inside the lock and exits.
HOLDER = """
import sys
from chimera.bench.lock import folder_lock
from chimera.bench.suite.execute import run_sweep

out, suite = sys.argv[1], sys.argv[2]
with folder_lock(out):
    print("held", flush=True)
    sys.stdin.readline()
    if suite != "-":
        run_sweep(suite, out, workers=1, progress=False)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lock of a folder; killed at the end if still running."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER, encoding="utf-8")
    procs = []

    def start(out, suite="-"):
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(suite)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _keys(records):
    return [(r["run_id"], r["record_type"], r.get("epoch"), r.get("step")) for r in records]


def test_second_sweep_is_refused_then_waits_for_the_first(tmp_path, holder, capsys):
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE, encoding="utf-8")
    out = tmp_path / "out"
    first = holder(out, suite)
    with pytest.raises(ValueError) as error:
        run_sweep(suite, out, workers=1, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"out: the folder {out} is in use by ")
    for part in (f"pid {first.pid} ", "holder.py", "since 20", "pass --wait"):
        assert part in message
    assert not list(out.glob("*.jsonl"))  # the refused sweep wrote nothing

    # the first sweep starts training once the second is already waiting for the folder
    go = threading.Timer(0.5, lambda: (first.stdin.write("go\n"), first.stdin.flush()))
    go.start()
    summary = run_sweep(suite, out, workers=1, progress=False, wait=True)
    go.join()
    assert first.wait(timeout=60) == 0
    assert f"waiting for {out}, in use by pid {first.pid}" in capsys.readouterr().err
    records = read_records(out)
    keys = _keys(records)
    assert len(keys) == len(set(keys))  # the second sweep resumed: nothing trained twice
    finals = Counter(r["run_id"] for r in records if r["record_type"] == "final")
    assert len(finals) == 2 and set(finals.values()) == {1}
    assert {r["epoch"] for r in records if r["record_type"] == "epoch"} == {1, 2}
    assert (out / "summary.md").read_text() == summary
    assert read_holder(out) is None  # released: a third sweep starts at once
    run_sweep(suite, out, workers=1, progress=False)


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, holder, capsys):
    out = tmp_path / "out"
    dead = holder(out)
    assert read_holder(out)["pid"] == dead.pid
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    with folder_lock(out) as folder:
        assert folder == out and read_holder(out)["pid"] == os.getpid()
        assert read_holder(out)["command"]
    err = capsys.readouterr().err
    assert f"taking over the lock on {out} left by pid {dead.pid} " in err
    assert "no longer running" in err and err.count("\n") == 1
    assert not (out / HOLDER_NAME).exists()


def test_waiting_process_takes_over_when_the_holder_is_killed(tmp_path, holder, capsys):
    out = tmp_path / "out"
    held = holder(out)
    kill = threading.Timer(0.5, held.kill)
    kill.start()
    with folder_lock(out, wait=True):
        assert held.poll() is not None and read_holder(out)["pid"] == os.getpid()
    kill.join()
    err = capsys.readouterr().err
    assert f"waiting for {out}, in use by pid {held.pid}" in err
    assert f"taking over the lock on {out} left by pid {held.pid}" in err


def test_same_thread_reenters_another_thread_is_refused(tmp_path):
    out = tmp_path / "a" / "b"
    with folder_lock(out), folder_lock(out):  # nested (run_bench around run_suite)
        assert out.is_dir() and read_holder(out)["pid"] == os.getpid()
        errors = []

        def other():
            try:
                with folder_lock(out):
                    pass
            except ValueError as e:
                errors.append(str(e))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert len(errors) == 1 and f"pid {os.getpid()} " in errors[0]
    assert read_holder(out) is None


def test_bad_arguments_raise_one_line(tmp_path):
    with pytest.raises(ValueError, match="^wait must be True or False, got 'yes'$"), \
            folder_lock(tmp_path, wait="yes"):
        pass
    file = tmp_path / "runs"
    file.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^out must be a folder \(not a file\), got '.*runs'$"), \
            folder_lock(file):
        pass
