"""Measuring: synchronised wall-clock timing of interleaved cases, and torch.profiler's top ops."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from chimera._validate import integer
from chimera.bench.perf.target import Setup


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
    integer("warmup", warmup, 0)
    integer("repeats", repeats, 1)
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


def milliseconds(t: dict[str, float]) -> dict[str, float]:
    """``{median_ms, min_ms, max_ms}`` of one case of :func:`time_cases`."""
    return {f"{key}_ms": t[f"{key}_s"] * 1e3 for key in ("median", "min", "max")}


def top_ops(fn: Callable[[], Any], device: torch.device, *, setup: Callable[[], Any] | None = None,
            calls: int = 3, top: int = 6) -> list[dict[str, Any]]:
    """The ``top`` ops of ``fn()`` by self time (device time on CUDA), per call, over ``calls``
    profiled calls (``setup()`` runs before each, outside the profile): ``[{op, ms, count}]``
    with count = calls of the op per ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    totals: dict[str, list[float]] = {}
    for _ in range(calls):
        if setup is not None:
            setup()
        synchronize(device)
        with profile(activities=activities) as prof:
            fn()
            synchronize(device)
        for e in prof.key_averages():
            acc = totals.setdefault(e.key, [0.0, 0])
            acc[0] += getattr(e, key)
            acc[1] += e.count
    ranked = sorted(totals.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    return [{"op": op, "ms": us / 1e3 / calls, "count": n / calls} for op, (us, n) in ranked]


def profile_case(setup: Setup, label: str, fn: Callable[[], Any],
                 step_setup: Callable[[], Any] | None = None) -> dict[str, Any]:
    """With ``--profile``: print the top ops of ``fn`` and return ``{"top_ops": [...]}``."""
    if not setup.profile:
        return {}
    ops = top_ops(fn, setup.device, setup=step_setup)
    print(f"profile {label}: " + "; ".join(f"{o['op']} {o['ms']:.2f} ms x{o['count']:g}"
                                           for o in ops))
    return {"top_ops": ops}
