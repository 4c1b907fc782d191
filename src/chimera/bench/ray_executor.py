"""Running harness jobs as Ray tasks (``chimera sweep|bench|tune --executor ray``), on a local
Ray instance or a cluster (docs/cluster.md). Needs the ``ray`` extra.

The records reach the output folder whether or not the workers share its filesystem: the
driver (the process that called :class:`RayExecutor`) is the only writer of the folder. Each
task gets the existing files its call names under the folder (a run's records and checkpoint,
for a resume), runs the call in a scratch folder on its node with those paths mapped into it,
and streams snapshots of the files back: one each time a file there appears or is atomically
replaced (a checkpoint at an epoch's end), and a last one with the result. The driver writes
each snapshot's files atomically, append-written ones (records) before replaced ones
(checkpoints), so a driver killed at any moment leaves a checkpoint whose records are all there
and the folder resumes like one the local pool wrote. A snapshot is taken when no file changed
while it was read. Tasks of a killed driver die with it (Ray ends a dead driver's tasks) and
can only ever write to their scratch folders.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from chimera._validate import number
from chimera.bench.workers import Call, Resources

POLL_S = 0.2  # how often a task looks for a new checkpoint to send back
_Stats = dict[str, tuple[int, int, int]]  # relative path -> (inode, size, mtime_ns)


def import_ray() -> Any:
    """The ``ray`` module, or one ``ValueError`` line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError('--executor ray needs the ray package: pip install -c constraints.txt '
                         '"chimera[ray]"') from None
    return ray


@dataclass(frozen=True)
class _InRoot:
    """A path argument inside the output folder, relative to it (the task maps it to scratch)."""

    rel: str


def _relative(arg: Any, root: Path) -> Any:
    """``arg`` with every absolute path string inside ``root`` (in tuples too) as an
    :class:`_InRoot`; other strings (a sink's name, say) stay as they are, whatever the working
    directory."""
    if isinstance(arg, tuple):
        return tuple(_relative(a, root) for a in arg)
    if isinstance(arg, str) and os.path.isabs(arg):
        path = Path(arg).resolve()
        if path.is_relative_to(root):
            return _InRoot(str(path.relative_to(root)))
    return arg


def _local(arg: Any, local: Path, rels: list[str]) -> Any:
    """``arg`` with each :class:`_InRoot` as its path in ``local``, noted in ``rels``."""
    if isinstance(arg, tuple):
        return tuple(_local(a, local, rels) for a in arg)
    if isinstance(arg, _InRoot):
        rels.append(arg.rel)
        return str(local / arg.rel)
    return arg


def _files(local: Path, rels: Sequence[str]) -> list[str]:
    """The files at or below each of ``rels`` in ``local``, relative to it."""
    found = []
    for rel in rels:
        path = local / rel
        if path.is_file():
            found.append(rel)
        elif path.is_dir():
            found += [str(f.relative_to(local)) for f in sorted(path.rglob("*")) if f.is_file()]
    return found


def _stats(local: Path, rels: Sequence[str]) -> _Stats:
    stats = {}
    for rel in _files(local, rels):
        try:
            st = (local / rel).stat()
        except FileNotFoundError:  # replaced or moved between the listing and the stat
            continue
        stats[rel] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return stats


def _snapshot(local: Path, rels: Sequence[str], sent: _Stats
              ) -> tuple[_Stats, list[tuple[str, bytes]]]:
    """The files changed since ``sent`` as (path, bytes), read while none changes: appended ones
    first, then the ones that appeared or were replaced; and the stats they were read at."""
    while True:
        before = _stats(local, rels)
        try:
            data = {rel: (local / rel).read_bytes() for rel, st in before.items()
                    if st != sent.get(rel)}
        except FileNotFoundError:
            continue
        if _stats(local, rels) == before:
            replaced = [rel for rel in data if sent.get(rel, (None,))[0] != before[rel][0]]
            order = [rel for rel in data if rel not in replaced] + replaced
            return before, [(rel, data[rel]) for rel in order]


def _replaced(old: _Stats, new: _Stats) -> bool:
    """A file appeared or was atomically replaced (a new inode)."""
    return any(old.get(rel, (None,))[0] != st[0] for rel, st in new.items())


def _mirrored(fn: Any, args: tuple[Any, ...], inputs: dict[str, bytes], threads: int
              ) -> Iterator[tuple[list[tuple[str, bytes]], bool, Any]]:
    """The body of a task: run ``fn(*args)`` in a scratch folder standing for the output folder
    (holding ``inputs``) and yield ``(files, done, result)`` snapshots (see the module's doc)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="chimera-ray-") as scratch:
        local, rels = Path(scratch), []
        mapped = _local(args, local, rels)
        for rel, data in inputs.items():
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_bytes(data)
        sent = _stats(local, rels)
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = fn(*mapped)
            except BaseException as e:  # re-raised in the task below
                outcome["error"] = e

        worker = threading.Thread(target=target, name="chimera-run", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(POLL_S)
            if worker.is_alive() and _replaced(sent, _stats(local, rels)):
                sent, files = _snapshot(local, rels, sent)
                yield files, False, None
        if "error" in outcome:
            raise outcome["error"]
        yield _snapshot(local, rels, sent)[1], True, outcome["result"]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.ray-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _inputs(args: tuple[Any, ...], root: Path) -> dict[str, bytes]:
    """The existing files among ``args``' paths (made by :func:`_relative`), for the task to
    start from."""
    rels: list[str] = []
    _local(args, root, rels)
    return {rel: (root / rel).read_bytes() for rel in rels if (root / rel).is_file()}


@dataclass(frozen=True)
class RayExecutor:
    """An :class:`~chimera.bench.workers.Executor` running each call as one Ray task needing
    ``cpus_per_run`` CPUs (its torch threads: at least 1) and ``gpus_per_run`` GPUs; each left
    None takes the suite's ``[resources]`` value, else 1 CPU and 0 GPUs. ``address``:
    the cluster to join (``"auto"``: the one started on this machine with ``ray start``; None: a
    local instance of ``workers`` CPUs, default the cores available). An already initialised
    Ray is used as it is."""

    address: str | None = None
    workers: int | None = None
    cpus_per_run: float | None = None
    gpus_per_run: float | None = None

    def __post_init__(self) -> None:
        if self.cpus_per_run is not None:  # None: the suite's, else the default
            number("--cpus-per-run", self.cpus_per_run, 0, low_open=True)
        if self.gpus_per_run is not None:
            number("--gpus-per-run", self.gpus_per_run, 0)

    def init(self) -> Any:
        """Ray, connected (started when needed)."""
        ray = import_ray()
        if not ray.is_initialized():
            if self.address is None:
                ray.init(num_cpus=self.workers, include_dashboard=False)
            else:
                ray.init(address=self.address)
        return ray

    def __call__(self, calls: Sequence[Call], progress: bool, desc: str,
                 root: Path | None, resources: Resources | None = None) -> list[Any]:
        ray = self.init()
        asked = resources or Resources()
        cpus = asked.num_cpus if self.cpus_per_run is None else self.cpus_per_run
        gpus = asked.num_gpus if self.gpus_per_run is None else self.gpus_per_run
        task = ray.remote(_mirrored).options(num_cpus=cpus, num_gpus=gpus)
        threads = max(1, int(cpus))
        root = None if root is None else root.resolve()
        pending = {}
        for i, (fn, args) in enumerate(calls):
            if root is not None:
                args = _relative(args, root)
            inputs = {} if root is None else _inputs(args, root)
            pending[task.remote(fn, args, inputs, threads)] = i
        results: list[Any] = [None] * len(calls)
        with tqdm(total=len(calls), desc=desc, disable=not progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for gen in ready:
                    files, done, result = self._next(ray, gen)
                    for rel, data in files:  # none without a root
                        _write_atomically(root / rel, data)
                    if done:
                        results[pending.pop(gen)] = result
                        bar.update()
        return results

    @staticmethod
    def _next(ray: Any, gen: Any) -> tuple[list[tuple[str, bytes]], bool, Any]:
        """The task's next snapshot; its own exception (not Ray's wrapper) when it failed."""
        try:
            return ray.get(next(gen))
        except ray.exceptions.RayTaskError as e:
            raise e.cause from None
