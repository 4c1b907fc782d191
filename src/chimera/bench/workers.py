"""The process pool every harness job runs on: one torch thread per worker process (the models
here are small: processes scale better than threads).

Workers die with the process that started the pool: each asks the kernel for SIGKILL when its
parent dies (Linux ``PR_SET_PDEATHSIG``) and runs a watchdog thread that ends it within
``WATCHDOG_S`` once that process is gone (a SIGKILL of the parent included), so no orphan goes on
writing records into a folder that a new run may already own.

:func:`execution` changes how the harness jobs started inside it run: on another executor (Ray,
:mod:`chimera.bench.ray_executor`) instead of this pool, and with records mirrored to sinks
(``log``: names of :data:`chimera.run.records.LOG_SINKS`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

Call = tuple[Callable[..., Any], tuple[Any, ...]]  # (module-level function, its arguments)


@dataclass(frozen=True)
class Resources:
    """What one run needs on an executor that places runs (a suite's ``[resources]``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


class Executor(Protocol):
    """Runs calls somewhere else than this pool: the results of ``fn(*args)`` in the given order.
    ``root``: the output folder the calls' absolute path arguments point into (None: they write
    none);
    ``resources``: what each call needs (None: the executor's default)."""

    def __call__(self, calls: Sequence[Call], progress: bool, desc: str,
                 root: Path | None, resources: Resources | None = None) -> list[Any]: ...


@dataclass(frozen=True)
class Execution:
    """How harness jobs run: ``executor`` (None: this module's process pool) and the record
    sinks ``log`` every training run mirrors its records to."""

    executor: Executor | None = None
    log: tuple[str, ...] = ()


_EXECUTION: ContextVar[Execution | None] = ContextVar("chimera_execution", default=None)


def current_execution() -> Execution:
    """The :class:`Execution` in effect (the default: this pool, no sinks)."""
    return _EXECUTION.get() or Execution()


@contextmanager
def execution(executor: Executor | None = None, log: Sequence[str] = ()) -> Iterator[Execution]:
    """Run the harness jobs started inside on ``executor`` and mirror their runs' records to the
    sinks named in ``log``; ``chimera sweep|bench|tune --executor/--log`` set it."""
    chosen = Execution(executor, tuple(log))
    token = _EXECUTION.set(chosen)
    try:
        yield chosen
    finally:
        _EXECUTION.reset(token)


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    """``workers``, or the cores available when None; ``ValueError`` below 1."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return workers or default_workers()


WATCHDOG_S = 0.5  # how often a worker checks that the process that started the pool is alive
_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not Path("/proc/self/stat").exists()  # no /proc: trust the signal check
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux only; else nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog still ends the worker


def _parent_gone(owner: int, parent: int) -> bool:
    """The pool's owner has died, or this process was re-parented (its parent died)."""
    return os.getppid() != parent or not pid_alive(owner)


def _watchdog(owner: int, parent: int) -> None:
    while not _parent_gone(owner, parent):
        time.sleep(WATCHDOG_S)
    os._exit(1)


def _guard_worker(owner: int) -> None:
    """Worker initializer: die with ``owner``, the process that started the pool. Its direct
    parent (``owner`` itself, or a launcher in between) is noted first; a worker whose owner is
    already gone exits at once."""
    parent = os.getppid()
    _die_with_parent()
    if _parent_gone(owner, parent):
        os._exit(1)
    threading.Thread(target=_watchdog, args=(owner, parent), name="chimera-watchdog",
                     daemon=True).start()


def _one_thread(fn: Callable[..., Any], *args: Any) -> Any:
    torch.set_num_threads(1)
    return fn(*args)


def run_calls(
    calls: Sequence[Call], workers: int | None = None, progress: bool = True,
    desc: str = "runs", *, root: str | os.PathLike | None = None,
    resources: Resources | None = None,
) -> list[Any]:
    """``fn(*args)`` of every call, with one torch thread, on ``workers`` spawned processes
    (default: the cores available; 1 = in this process), started in the given order; returns
    the results in that order. The workers die with this process (see the module's doc).
    Inside :func:`execution` with an executor, that executor runs them instead (``root``: the
    folder their absolute path arguments write into; ``resources``: what each call needs there; the
    local pool runs one call per process whatever it asks)."""
    workers = resolve_workers(workers)
    executor = current_execution().executor
    if executor is not None:
        return executor(calls, progress, desc, None if root is None else Path(root), resources)
    bar = tqdm(total=len(calls), desc=desc, disable=not progress)
    results: list[Any] = [None] * len(calls)
    if workers == 1:
        for i, (fn, args) in enumerate(calls):
            results[i] = _one_thread(fn, *args)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_guard_worker, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_one_thread, fn, *args): i for i, (fn, args) in enumerate(calls)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    return results
