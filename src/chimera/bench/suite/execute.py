"""Run many jobs on a pool of worker processes; training runs get one record file each.

Each worker uses one torch thread (the models here are small: processes scale better than
threads). Every run writes ``<out>/<run_id>.jsonl``. By default an existing file for that run is
replaced, so a rerun never duplicates records; with ``resume`` each run also keeps its checkpoint
``<out>/checkpoints/<run_id>.pt`` (rewritten every epoch), a finished run (its file has a final
record) is skipped, and an unfinished one continues from its checkpoint (a learning rule's
feedback networks included).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec
from chimera.run.trainer import train

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


def _run_one(spec_dict: dict[str, Any], path: str, checkpoint: str | None) -> dict[str, Any]:
    """Train one spec into ``path``; with a ``checkpoint`` path, resume (or skip) instead of
    starting over."""
    spec = RunSpec(**spec_dict)
    if checkpoint is not None and Path(path).exists():
        finals = read_records(path, record_type="final")
        if finals:
            return {**spec_dict, **finals[-1]}
    if checkpoint is None or not Path(checkpoint).exists():
        Path(path).unlink(missing_ok=True)  # records without a checkpoint: start over
    with RecordWriter(path) as writer:
        return {**spec_dict, **train(spec, writer, progress=False, checkpoint=checkpoint,
                                     resume=checkpoint is not None)}


def spec_call(spec: RunSpec, out: str | os.PathLike, resume: bool = False) -> Call:
    """The job that trains ``spec`` into ``<out>/<run_id>.jsonl`` (see :func:`run_specs`)."""
    out = Path(out)
    checkpoint = str(out / "checkpoints" / f"{spec.run_id}.pt") if resume else None
    return _run_one, (spec.to_dict(), str(out / f"{spec.run_id}.jsonl"), checkpoint)


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


def run_specs(
    specs: Sequence[RunSpec], out: str | os.PathLike, workers: int | None = None,
    progress: bool = True, desc: str = "runs", resume: bool = False,
) -> list[dict[str, Any]]:
    """Train every spec (``workers`` processes; 1 = in this process) and return, in spec order,
    each spec's fields merged with its final metrics. ``resume``: skip finished runs, continue
    unfinished ones from ``<out>/checkpoints/<run_id>.pt``."""
    Path(out).mkdir(parents=True, exist_ok=True)
    return run_calls([spec_call(s, out, resume) for s in specs], workers, progress, desc)
