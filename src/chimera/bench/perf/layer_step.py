"""``chimera perf layers``: ternary training steps against their float twins, in one run.

(a) ``BitLinear(features, features)`` vs ``nn.Linear``: one training step = forward, backward
    with a fixed output gradient (input gradient included, as for a hidden layer); for each
    quantizer (strict_bitnet, chimera) on the eager path and on the compiled fast path.
(b) ResNet-20 vs ``ChimeraResNet20(mode="chimera")`` (every conv and the classifier ternarized
    by ``ternarize``): one training step = zero_grad, forward, cross-entropy, backward,
    ``SGD(lr=0.01, momentum=0.9)`` step on random CIFAR-shaped data; throughput = batch / step.

Settings: on CUDA, bf16 autocast around forward and loss and channels_last model and input (both
(a) and (b)); on CPU fp32 and contiguous tensors. The ResNet batch defaults to 512 on CUDA and to
64 on CPU. ``fast path`` is ``eager`` (``compiled=False``) or ``compiled`` (``compiled=True``);
the ``default`` column marks the path that ``compiled=None`` picks on this device. The rows of
each case are timed interleaved (round-robin), so load changes of a shared machine hit them alike.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chimera.bench.perf.results import fmt, goal, report
from chimera.bench.perf.target import Setup, perf_target
from chimera.bench.perf.timing import milliseconds, profile_case, time_cases
from chimera.compile_support import compile_usable
from chimera.models import ChimeraResNet20, resnet20
from chimera.nn.bit_layers import QUANT_MODES, BitLinear

# (warmup, repeats) by (device type, case); --quick: (1, 1)
COUNTS = {("cpu", "linear"): (3, 20), ("cpu", "resnet20"): (2, 5),
          ("cuda", "linear"): (10, 50), ("cuda", "resnet20"): (5, 20)}
LINEAR_GOAL = 1.5  # BitLinear step / nn.Linear step, CPU, batch 256, 1024 -> 1024
RESNET_GOAL = 0.8  # chimera ResNet-20 throughput / fp ResNet-20, CUDA, batch 512, bf16


def precision(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing (fp32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def paths(setup: Setup) -> list[tuple[str, bool]]:
    """(name, compiled) of the fast-path settings to measure."""
    return [("eager", False), *([("compiled", True)] if setup.compile else [])]


def linear_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                device: torch.device) -> Callable[[], None]:
    """Forward and backward of one layer, gradients to the input included."""
    x = x.clone().requires_grad_(True)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with precision(device):
            y = layer(x)
        y.backward(grad.to(y.dtype))

    return step


def resnet_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                device: torch.device) -> Callable[[], None]:
    """zero_grad, forward, cross-entropy, backward, SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with precision(device):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()

    return step


def measure(setup: Setup, case: str, entries: list[tuple[dict[str, Any], Callable[[], None]]],
            counts: dict[str, int]) -> list[dict[str, Any]]:
    """Rows of one case: its ``(row fields, step)`` entries timed interleaved."""
    times = time_cases([fn for _, fn in entries], setup.device, **counts)
    rows = []
    for (fields, fn), t in zip(entries, times, strict=True):
        label = f"{case} {fields['layer']} {fields['quant']} {fields['fast_path']}"
        rows.append({"case": case, **fields, **milliseconds(t), "first_call_s": t["first_s"],
                     **counts, **profile_case(setup, label, fn)})
    return rows


def linear_rows(setup: Setup, features: int, batch: int) -> list[dict[str, Any]]:
    device = setup.device
    counts = setup.counts(*(1, 1) if setup.quick else COUNTS[(device.type, "linear")])
    x = torch.randn(batch, features, device=device)
    grad = torch.randn(batch, features, device=device)
    base = {"batch": batch, "features": features}
    torch.manual_seed(0)
    entries = [({**base, "layer": "nn.Linear", "quant": "fp32", "fast_path": "-",
                 "default": True},
                linear_step(nn.Linear(features, features, device=device), x, grad, device))]
    auto = compile_usable(device.type)
    for quant in QUANT_MODES:
        for path, compiled in paths(setup):
            torch.manual_seed(0)
            layer = BitLinear(features, features, quant_mode=quant, compiled=compiled).to(device)
            entries.append(({**base, "layer": "BitLinear", "quant": quant, "fast_path": path,
                             "default": compiled == auto}, linear_step(layer, x, grad, device)))
    return measure(setup, "linear", entries, counts)


def resnet_rows(setup: Setup, batch: int) -> list[dict[str, Any]]:
    device = setup.device
    counts = setup.counts(*(1, 1) if setup.quick else COUNTS[(device.type, "resnet20")])
    layout = memory_format(device)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=layout)
    labels = torch.randint(0, 10, (batch,), device=device)
    base = {"batch": batch, "features": None}
    auto = compile_usable(device.type)
    models: list[tuple[str, str, bool | None, Callable[[], nn.Module]]] = [
        ("ResNet20", "fp32", None, lambda: resnet20())]
    models += [("ChimeraResNet20", "chimera", compiled,
                lambda c=compiled: ChimeraResNet20(mode="chimera", quant_config={"compiled": c}))
               for _, compiled in paths(setup)]
    entries = []
    for name, quant, compiled, build in models:
        torch.manual_seed(0)
        model = build().to(device, memory_format=layout)
        path = "-" if compiled is None else ("compiled" if compiled else "eager")
        entries.append(({**base, "layer": name, "quant": quant, "fast_path": path,
                         "default": compiled is None or compiled == auto},
                        resnet_step(model, x, labels, device)))
    return measure(setup, "resnet20", entries, counts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``chimera perf layers`` beyond the common ones."""
    parser.add_argument("--features", type=int, default=1024,
                        help="BitLinear in = out features (default 1024)")
    parser.add_argument("--batch", type=int, default=256, help="BitLinear batch (default 256)")
    parser.add_argument("--resnet-batch", type=int, default=None,
                        help="ResNet-20 batch (default: 512 on CUDA, 64 on CPU)")


@perf_target("layers", help="BitLinear and ternary ResNet-20 training steps vs nn.Linear / fp",
             out="perf-layers.jsonl", options=add_arguments,
             positive=("batch", "features", "resnet_batch"))
def run(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    cuda = setup.device.type == "cuda"
    features, batch = (32, 8) if setup.quick else (args.features, args.batch)
    resnet_batch = 2 if setup.quick else (args.resnet_batch or (512 if cuda else 64))
    rows = linear_rows(setup, features, batch) + resnet_rows(setup, resnet_batch)
    for case in ("linear", "resnet20"):
        case_rows = [r for r in rows if r["case"] == case]
        base = case_rows[0]
        for r in case_rows:
            r["samples_per_s"] = r["batch"] / (r["median_ms"] / 1e3)
            r["time_ratio"] = r["median_ms"] / base["median_ms"]
            r["throughput_ratio"] = base["median_ms"] / r["median_ms"]

    def best_default(case: str, quant: str) -> dict[str, Any]:
        """The row of ``compiled=None``'s path, else (not measured) the eager one."""
        found = [r for r in rows if r["case"] == case and r["quant"] == quant]
        return next((r for r in found if r["default"]), found[0])

    lin, res = best_default("linear", "chimera"), best_default("resnet20", "chimera")
    where = "cuda bf16 channels_last" if cuda else "cpu fp32"
    goals = [goal(f"BitLinear chimera {features}->{features} batch {batch} step / nn.Linear "
                  f"({where}, {lin['fast_path']} path; goal set for CPU)", lin["time_ratio"],
                  "<=", LINEAR_GOAL),
             goal(f"chimera ResNet-20 throughput / fp ResNet-20 (batch {resnet_batch}, {where}, "
                  f"{res['fast_path']} path; goal set for CUDA bf16 batch 512)",
                  res["throughput_ratio"], ">=", RESNET_GOAL)]
    columns = [("case", lambda r: r["case"]), ("layer", lambda r: r["layer"]),
               ("quant", lambda r: r["quant"]), ("fast path", lambda r: r["fast_path"]),
               ("default", lambda r: "yes" if r["default"] else ""),
               ("batch", lambda r: r["batch"]), ("step ms", lambda r: fmt(r["median_ms"])),
               ("samples/s", lambda r: fmt(r["samples_per_s"], ".0f")),
               ("x float (time)", lambda r: fmt(r["time_ratio"])),
               ("1st call s", lambda r: fmt(r["first_call_s"]))]
    notes = [f"settings: {where}; ratios are step-time ratios to the float row of the same case"]
    report("perf-layers", setup, rows, columns, goals, notes)
    return rows
