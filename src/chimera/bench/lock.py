"""One writer per output folder: :func:`folder_lock` takes ``<out>/.chimera.lock`` (a
:class:`filelock.FileLock`) for every command that writes a folder of runs (``chimera sweep``,
``chimera bench``), so two of them never append to the same record files.

The holder (pid, host, command, start time) is recorded beside the lock in
``<out>/.chimera.holder.json``: a second process is refused with one line naming it, or waits
for it with ``wait=True``. The operating system frees the lock of a killed process; the record it
left behind (its pid no longer alive on this host) is then reported on stderr and replaced.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from chimera._validate import require
from chimera.bench.workers import pid_alive

LOCK_NAME = ".chimera.lock"
HOLDER_NAME = ".chimera.holder.json"
_SETTLE_S = 2.0  # how long a refused process lets a new holder write its record before naming it
_HELD: dict[Path, int] = {}  # folders this process holds -> the thread that took the lock


def _command() -> str:
    """This process's command line, e.g. ``chimera sweep s.toml --out runs``."""
    argv = sys.argv or ["python"]
    name = Path(argv[0]).name
    name = {"__main__.py": "python -m chimera", "-c": "python -c"}.get(name, name)
    return " ".join([name, *map(shlex.quote, argv[1:])])


def read_holder(out: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in ``out`` (pid, host, command, since), or None when there is none or
    its record cannot be read."""
    try:
        holder = json.loads((Path(out) / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _is_stale(holder: dict[str, Any] | None) -> bool:
    """The recorded holder is a process of this host that no longer runs."""
    return (holder is not None and holder.get("host") == socket.gethostname()
            and not pid_alive(holder["pid"]))


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another process (no holder recorded)"
    return (f"pid {holder['pid']} on {holder.get('host')} ({holder.get('command')!r}) "
            f"since {holder.get('since')}")


def _write_holder(out: Path) -> None:
    """Record this process as the holder (written whole, then renamed into place)."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = out / f"{HOLDER_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(holder) + "\n", encoding="utf-8")
    os.replace(tmp, out / HOLDER_NAME)


def _refuse(lock: FileLock, out: Path) -> None:
    """Raise the one-line refusal naming the holder, after giving a holder that just took the
    lock time to record itself (until then the record is missing or names the previous one)."""
    deadline = time.monotonic() + _SETTLE_S
    holder = read_holder(out)
    while (holder is None or _is_stale(holder)) and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            lock.acquire(timeout=0)
            return
        except Timeout:
            holder = read_holder(out)
    raise ValueError(f"out: the folder {out} is in use by {_describe(holder)}; pass --wait to "
                     "wait for it to finish, or choose another --out")


def _acquire(lock: FileLock, out: Path, wait: bool) -> None:
    """Take ``lock``: at once, or refuse (``wait=False``), or block until it is free."""
    try:
        lock.acquire(timeout=0)
        return
    except Timeout:
        if not wait:
            _refuse(lock, out)
            return
    print(f"chimera: waiting for {out}, in use by {_describe(read_holder(out))}",
          file=sys.stderr, flush=True)
    lock.acquire()


@contextmanager
def folder_lock(out: str | os.PathLike, wait: bool = False) -> Iterator[Path]:
    """Create the folder ``out`` and hold its exclusive lock for the ``with`` block (yields the
    folder). Held by another process: one ``ValueError`` line naming it, or with ``wait`` block
    until it is free. Re-entered by the thread holding it: passes through."""
    require(isinstance(wait, bool), "wait", wait, "True or False")
    out = Path(out)
    require(not out.exists() or out.is_dir(), "out", str(out), "a folder (not a file)")
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if _HELD.get(key) == threading.get_ident():
        yield out
        return
    lock = FileLock(out / LOCK_NAME, thread_local=False)
    _acquire(lock, out, wait)
    try:
        previous = read_holder(out)
        if _is_stale(previous):
            print(f"chimera: taking over the lock on {out} left by {_describe(previous)}, which "
                  "is no longer running", file=sys.stderr, flush=True)
        _write_holder(out)
        _HELD[key] = threading.get_ident()
        yield out
    finally:
        _HELD.pop(key, None)
        if (read_holder(out) or {}).get("pid") == os.getpid():
            (out / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()
