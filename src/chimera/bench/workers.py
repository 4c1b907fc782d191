"""The process pool every harness job runs on: one torch thread per worker process (the models
here are small: processes scale better than threads)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

import torch
from tqdm.auto import tqdm

Call = tuple[Callable[..., Any], tuple[Any, ...]]  # (module-level function, its arguments)


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    """``workers``, or the cores available when None; ``ValueError`` below 1."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return workers or default_workers()


def _one_thread(fn: Callable[..., Any], *args: Any) -> Any:
    torch.set_num_threads(1)
    return fn(*args)


def run_calls(
    calls: Sequence[Call], workers: int | None = None, progress: bool = True,
    desc: str = "runs",
) -> list[Any]:
    """``fn(*args)`` of every call, with one torch thread, on ``workers`` spawned processes
    (default: the cores available; 1 = in this process), started in the given order; returns
    the results in that order."""
    workers = resolve_workers(workers)
    bar = tqdm(total=len(calls), desc=desc, disable=not progress)
    results: list[Any] = [None] * len(calls)
    if workers == 1:
        for i, (fn, args) in enumerate(calls):
            results[i] = _one_thread(fn, *args)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_one_thread, fn, *args): i for i, (fn, args) in enumerate(calls)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    return results
