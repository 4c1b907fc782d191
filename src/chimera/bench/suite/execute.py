"""Running suites: :func:`run_sweep` (``chimera sweep``) and :func:`run_suite` put every job of a
suite on one pool of worker processes; training runs get one record file each.

Each worker uses one torch thread (the models here are small: processes scale better than
threads). Every run writes ``<out>/<run_id>.jsonl``. By default an existing file for that run is
replaced, so a rerun never duplicates records; with ``resume`` each run also keeps its checkpoint
``<out>/checkpoints/<run_id>.pt`` (rewritten every epoch), a finished run (its file has a final
record) is skipped, and an unfinished one continues from its checkpoint (a learning rule's
feedback networks included). One process at a time writes into a folder (its lock:
:mod:`chimera.bench.lock`). Inside :func:`chimera.bench.workers.execution` the jobs run on its
executor (e.g. Ray) and each run also mirrors its records to the sinks it names, under
``<folder>/<sink name>/`` (``<folder>/tensorboard/<run_id>/``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chimera.bench.lock import folder_lock
from chimera.bench.report.tables import runs_table
from chimera.bench.suite.schema import load_suite
from chimera.bench.suite.sections import Suite
from chimera.bench.workers import Call, current_execution, resolve_workers, run_calls
from chimera.run.records import LOG_SINKS, RecordWriter, read_records
from chimera.run.spec import RunSpec
from chimera.run.trainer import train


def _run_one(spec_dict: dict[str, Any], path: str, checkpoint: str | None,
             sinks: tuple[tuple[str, str], ...] = (),
             fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one spec into ``path``; with a ``checkpoint`` path, resume (or skip) instead of
    starting over. ``sinks``: (name in LOG_SINKS, its folder) pairs mirroring the records;
    ``fields``: added to every record (``chimera tune``'s phase)."""
    spec = RunSpec(**spec_dict)
    if checkpoint is not None and Path(path).exists():
        finals = read_records(path, record_type="final")
        if finals:
            return {**spec_dict, **finals[-1]}
    if checkpoint is None or not Path(checkpoint).exists():
        Path(path).unlink(missing_ok=True)  # records without a checkpoint: start over
    with RecordWriter(path, fields,
                      sinks=[LOG_SINKS[name](folder) for name, folder in sinks]) as writer:
        final = train(spec, writer, progress=False, checkpoint=checkpoint,
                      resume=checkpoint is not None)
        return {**spec_dict, **(fields or {}), **final}


def spec_call(spec: RunSpec, out: str | os.PathLike, resume: bool = False,
              fields: Mapping[str, Any] | None = None) -> Call:
    """The job that trains ``spec`` into ``<out>/<run_id>.jsonl`` (the folder must exist); with
    ``resume`` it skips a finished run and continues an unfinished one from
    ``<out>/checkpoints/<run_id>.pt``. Its result: the spec's fields merged with the final
    metrics. The records also go to the sinks of the :func:`~chimera.bench.workers.execution`
    in effect, each under ``<out>/<its name>``; ``fields`` are added to every record."""
    out = Path(out)
    checkpoint = str(out / "checkpoints" / f"{spec.run_id}.pt") if resume else None
    sinks = tuple((name, str(out / name)) for name in current_execution().log)
    return _run_one, (spec.to_dict(), str(out / f"{spec.run_id}.jsonl"), checkpoint, sinks,
                      dict(fields or {}))


def _summary(suite: Suite, one_file: dict[str, list[dict[str, Any]]],
             grid_results: list[list[dict[str, Any]]]) -> str:
    """Per section a ``## heading`` and its table, in the order stress, grids, toy LQ."""
    parts: list[tuple[str | None, str]] = []
    if suite.stress is not None:
        parts.append((suite.stress.heading(), suite.stress.table(one_file[suite.stress.file])))
    parts += [(grid.heading(), runs_table(results))
              for grid, results in zip(suite.grids, grid_results, strict=True)]
    if suite.toy_lq is not None:
        parts.append((suite.toy_lq.heading(), suite.toy_lq.table(one_file[suite.toy_lq.file])))
    return "\n\n".join(table if heading is None else f"## {heading}\n\n{table}"
                        for heading, table in parts) + "\n"


def _execute(suite: Suite, out: Path, workers: int, progress: bool, resume: bool,
             desc: str) -> str:
    """:func:`run_suite`'s work, with the folder ``out`` locked."""
    out = out.absolute()  # absolute path arguments: what an executor maps (run_calls' root)
    one_file = [s for s in (suite.stress, suite.toy_lq) if s is not None]
    done = {s.file: s.finished(out / s.file) if resume else None for s in one_file}
    calls: list[Call] = [(s.run, (str(out / s.file),)) for s in one_file if done[s.file] is None]
    for grid in suite.grids:
        (out / grid.name).mkdir(parents=True, exist_ok=True)
        calls += [spec_call(spec, out / grid.name, resume, grid.record_fields)
                  for spec in grid.specs]
    results = iter(run_calls(calls, workers, progress, desc, root=out, resources=suite.resources))
    finals = {s.file: done[s.file] or next(results) for s in one_file}
    summary = _summary(suite, finals, [[next(results) for _ in g.specs] for g in suite.grids])
    (out / "summary.md").write_text(summary, encoding="utf-8")
    return summary


def run_suite(
    suite: Suite, out: str | os.PathLike, workers: int | None = None, progress: bool = True,
    resume: bool = True, desc: str = "runs", *, wait: bool = False,
) -> str:
    """Run ``suite`` (from :func:`chimera.bench.suite.schema.load_suite`) into ``out`` on one
    pool of ``workers`` processes (the stress and toy LQ sections as one job each, started
    first) and return the summary (markdown: per section a ``## heading`` and its table), also
    written to ``out/summary.md``.

    ``resume``: skip finished training runs, continue interrupted ones from their checkpoints,
    and reuse a stress / toy LQ file holding every final record of its section; otherwise every
    record file is rewritten.

    The folder is locked for the whole run (:func:`chimera.bench.lock.folder_lock`): while
    another process writes into it this raises one ``ValueError`` line naming that process, or
    with ``wait`` waits for it to finish.
    """
    workers = resolve_workers(workers)
    with folder_lock(out, wait) as folder:
        return _execute(suite, folder, workers, progress, resume, desc)


def run_sweep(
    path: str | os.PathLike, out: str | os.PathLike, workers: int | None = None,
    progress: bool = True, *, wait: bool = False,
) -> str:
    """Run (or finish) the suite file at ``path`` into ``out`` (``chimera sweep``); returns the
    summary, which is also written to ``out/summary.md``. ``wait``: wait for another process
    writing into ``out`` to finish instead of refusing to start (see :func:`run_suite`)."""
    return run_suite(load_suite(path), out, workers, progress, resume=True, desc=Path(path).stem,
                     wait=wait)
