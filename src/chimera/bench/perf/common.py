"""What every perf target shares: its common options, the machine description, goals, output.

Every target prints a header line (device, threads, torch), its table, one line per goal (met /
not met) and writes one ``summary`` record per table row (``kind: "case"``) and per goal
(``kind: "goal"``), each with ``benchmark: "perf-<target>"`` and the machine fields (schema in
docs/records.md).
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import chimera
from chimera.bench.perf.core import synchronize
from chimera.bench.report.stats import format_table
from chimera.run.build import resolve_device
from chimera.run.records import RecordWriter


def add_common_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
    """``--device --warmup --repeats --threads --no-compile --quick --out``."""
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds before timing (default: per device and case)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds, one call of every case each (interleaved); the median "
                             "is reported (default: per device and case)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip every variant that needs torch.compile")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few repeats: a smoke test, the numbers mean nothing")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each case (torch.profiler) and print its top ops")
    parser.add_argument("--out", default=out, help="JSONL record file (appended)")


@dataclass(frozen=True)
class Setup:
    """The resolved common options of one run."""

    device: torch.device
    warmup: int | None
    repeats: int | None
    compile: bool
    quick: bool
    profile: bool
    out: str
    machine: dict[str, Any]

    def counts(self, warmup: int, repeats: int) -> dict[str, int]:
        """``{warmup, repeats}``: the command line's values, else the given defaults."""
        return {"warmup": warmup if self.warmup is None else self.warmup,
                "repeats": repeats if self.repeats is None else self.repeats}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: device name, CPU cores and threads, torch and CUDA."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model()),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": {"chimera": chimera.__version__, "torch": torch.__version__},
    }
    if device.type == "cuda":
        info["versions"]["cuda"] = torch.version.cuda
    return info


def resolve(args: argparse.Namespace) -> Setup:
    """Check the common options, apply ``--threads`` and describe the machine."""
    for name in ("warmup", "repeats", "threads"):
        value, low = getattr(args, name), 0 if name == "warmup" else 1
        if value is not None and value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}")
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return Setup(device, args.warmup, args.repeats, not args.no_compile, args.quick,
                 args.profile, args.out, machine_info(device))


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


def goal(name: str, value: float | None, op: str, limit: float) -> dict[str, Any]:
    """A goal ``value op limit`` (op ``<=`` or ``>=``); ``met`` is None when not measured."""
    met = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"goal": name, "value": value, "op": op, "limit": limit, "met": met}


def goal_line(g: dict[str, Any]) -> str:
    verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
    value = "-" if g["value"] is None else f"{g['value']:.3f}"
    return f"goal {g['goal']}: {value} (goal {g['op']} {g['limit']}) -> {verdict}"


def fmt(value: float | None, spec: str = ".2f") -> str:
    """A table cell: ``value`` formatted, '-' for None."""
    return "-" if value is None else format(value, spec)


def report(
    benchmark: str,
    setup: Setup,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, Callable[[dict], Any]]],
    goals: Sequence[dict[str, Any]],
    notes: Sequence[str] = (),
) -> None:
    """Print the header, table, notes and goals; append one record per row and per goal."""
    m = setup.machine
    print(f"{benchmark} on {m['device']} ({m['device_name']}), {m['threads']} torch threads, "
          f"torch {m['versions']['torch']}")
    print(format_table(rows, columns))
    for line in [*notes, *map(goal_line, goals)]:
        print(line)
    with RecordWriter(setup.out, {"benchmark": benchmark, **m}) as writer:
        for row in rows:
            writer.write("summary", kind="case", **row)
        for g in goals:
            writer.write("summary", kind="goal", **g)
    print(f"records: {setup.out}")
