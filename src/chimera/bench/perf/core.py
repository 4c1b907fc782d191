"""The registry of perf targets and the timer they share."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chimera.registry import Registry


@dataclass(frozen=True)
class PerfTarget:
    """One ``chimera perf <name>`` benchmark: ``add_arguments(parser)`` declares its options,
    ``run(args) -> rows`` measures and returns table rows (dicts, one per measured case)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list[dict[str, Any]]]
    help: str


PERF_TARGETS: Registry[Any] = Registry("perf target")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(
    fns: Sequence[Callable[[], Any]],
    device: torch.device | str,
    *,
    warmup: int = 3,
    repeats: int = 10,
    setups: Sequence[Callable[[], Any] | None] | None = None,
) -> list[dict[str, float]]:
    """Wall times of several cases, interleaved: ``warmup`` untimed rounds, then ``repeats``
    timed rounds, each round calling every ``fns[i]()`` once in order, each call synchronised
    with ``device``; ``setups[i]()`` (untimed, e.g. fresh gradients) runs before every call of
    case i. Interleaving spreads a shared machine's load changes evenly over the cases, so their
    ratios stay meaningful. Per case ``{median_s, min_s, max_s, first_s}``; ``first_s`` is its
    first call (compilation included, if any)."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    setups = [None] * len(fns) if setups is None else list(setups)
    if len(setups) != len(fns):
        raise ValueError(f"setups must have one entry per case ({len(fns)}), got {len(setups)}")
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(warmup + repeats):
        for fn, setup, out in zip(fns, setups, times, strict=True):
            if setup is not None:
                setup()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - start)
    return [{"median_s": statistics.median(t[warmup:]), "min_s": min(t[warmup:]),
             "max_s": max(t[warmup:]), "first_s": t[0]} for t in times]


def time_fn(
    fn: Callable[[], Any],
    device: torch.device | str,
    *,
    warmup: int = 3,
    repeats: int = 10,
    setup: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """:func:`time_cases` of the single case ``fn`` (with its ``setup``)."""
    return time_cases([fn], device, warmup=warmup, repeats=repeats, setups=[setup])[0]
