"""Run many specs on a pool of worker processes, one record file per run.

Each worker uses one torch thread (the models here are small: processes scale better than
threads). Every run writes ``<out>/<run_id>.jsonl``. By default an existing file for that run is
replaced, so a rerun never duplicates records; with ``resume`` each run also keeps its checkpoint
``<out>/checkpoints/<run_id>.pt`` (rewritten every epoch), a finished run (its file has a final
record) is skipped, and an unfinished one continues from its checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from chimera.bench.records import RecordWriter, read_records
from chimera.bench.spec import RunSpec
from chimera.bench.trainer import train


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_one(spec_dict: dict[str, Any], path: str, checkpoint: str | None) -> dict[str, Any]:
    """Train one spec into ``path``; with a ``checkpoint`` path, resume (or skip) instead of
    starting over."""
    torch.set_num_threads(1)
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


def run_specs(
    specs: Sequence[RunSpec], out: str | os.PathLike, workers: int | None = None,
    progress: bool = True, desc: str = "runs", resume: bool = False,
) -> list[dict[str, Any]]:
    """Train every spec (``workers`` processes; 1 = in this process) and return, in spec order,
    each spec's fields merged with its final metrics. ``resume``: skip finished runs, continue
    unfinished ones from ``<out>/checkpoints/<run_id>.pt``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or default_workers()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = [(s.to_dict(), str(out / f"{s.run_id}.jsonl"),
             str(out / "checkpoints" / f"{s.run_id}.pt") if resume else None) for s in specs]
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if workers == 1:
        for i, job in enumerate(jobs):
            results[i] = _run_one(*job)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, *job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    return results  # type: ignore[return-value]
