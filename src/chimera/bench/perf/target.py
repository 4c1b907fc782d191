"""What a ``chimera perf`` target is: its registration, the options every target shares and the
resolved settings of one run (device, round counts, the machine the numbers come from).

A target module declares its own options and a ``run(setup, args) -> rows`` function and
registers both with :func:`perf_target`; ``chimera perf <name>`` then parses the common options
(``--device --warmup --repeats --threads --no-compile --quick --profile --out``) and the
target's, checks them, and calls ``run`` with the resolved :class:`Setup`.
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
from chimera._validate import require
from chimera.registry import Registry
from chimera.run.build import resolve_device

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class PerfTarget:
    """One ``chimera perf <name>`` benchmark: ``add_arguments(parser)`` declares its options,
    ``run(args) -> rows`` measures and returns table rows (dicts, one per measured case)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Rows]
    help: str


PERF_TARGETS: Registry[Any] = Registry("perf target")


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


def _add_common_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
    """``--device --warmup --repeats --threads --no-compile --quick --profile --out``."""
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


def resolve(args: argparse.Namespace, positive: Sequence[str] = ()) -> Setup:
    """Check the common options and the target's options named in ``positive`` (each >= 1 when
    given), apply ``--threads`` and describe the machine."""
    lows = {"warmup": 0, "repeats": 1, "threads": 1, **dict.fromkeys(positive, 1)}
    for name, low in lows.items():
        value = getattr(args, name)
        require(value is None or value >= low, f"--{name.replace('_', '-')}", value, f">= {low}")
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return Setup(device, args.warmup, args.repeats, not args.no_compile, args.quick,
                 args.profile, args.out, machine_info(device))


def perf_target(
    name: str,
    *,
    help: str,
    out: str,
    options: Callable[[argparse.ArgumentParser], None],
    positive: Sequence[str] = (),
) -> Callable[[Callable[[Setup, argparse.Namespace], Rows]], Callable[..., Rows]]:
    """Decorator registering ``run(setup, args) -> rows`` as ``chimera perf <name>``: the common
    options (records appended to ``out`` by default) plus those ``options(parser)`` adds; the
    target's options named in ``positive`` must be >= 1."""

    def register(run: Callable[[Setup, argparse.Namespace], Rows]) -> Callable[..., Rows]:
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            _add_common_arguments(parser, out=out)
            options(parser)

        def run_args(args: argparse.Namespace) -> Rows:
            return run(resolve(args, positive), args)

        PERF_TARGETS.register(name)(PerfTarget(add_arguments, run_args, help))
        return run

    return register
