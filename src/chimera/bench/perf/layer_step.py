"""``chimera perf layers``: ternary layers against their float twins, in one run.

(a) ``train``: ``BitLinear(f, f)`` vs ``nn.Linear`` at (f, batch) = (1024, 256) and (4096, 1):
    one training step = forward, backward with a fixed output gradient (input gradient included,
    as for a hidden layer). Rows: ``nn.Linear``; BitLinear (chimera quantizer) on the path
    ``compiled=None`` picks (``default``), eager (``compiled=False``) and compiled
    (``compiled=True``); BitLinear strict_bitnet on the default path.
(b) ``eval``: a 3-layer MLP of width f (4096; Linear-ReLU-Linear-ReLU-Linear) in eval mode under
    ``torch.no_grad``, at batch 1 and 16: the float model, the same model ternarized
    (``ternarize(model, "chimera", skip=())``, weights unchanged since the last forward), and its
    packed inference copy (``export_ternary`` then ``load_ternary``, 1.6 bits per weight on disk).
(c) ``resnet20``: ResNet-20 vs ``ChimeraResNet20(mode="chimera")`` (every conv and the classifier
    ternarized): one training step = zero_grad, forward, cross-entropy, backward,
    ``SGD(lr=0.01, momentum=0.9)`` step on random CIFAR-shaped data; throughput = batch / step.

Settings: on CUDA, bf16 autocast around forward and loss and channels_last model and input
((a) and (c)); on CPU fp32 and contiguous tensors. The ResNet batch defaults to 512 on CUDA and
to 64 on CPU. The rows of each case (and batch) are timed interleaved (round-robin), so load
changes of a shared machine hit them alike; each ratio is to the float row of its case.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chimera._validate import require
from chimera.bench.perf.results import fmt, goal, report
from chimera.bench.perf.target import Setup, perf_target
from chimera.bench.perf.timing import milliseconds, profile_case, time_cases
from chimera.deploy import export_ternary, load_ternary
from chimera.models import ChimeraResNet20, resnet20
from chimera.nn.bit_layers import BitLinear
from chimera.nn.quantize import ternarize

# (warmup, repeats) by (device type, case); --quick: (1, 1)
COUNTS = {("cpu", "train"): (3, 20), ("cpu", "eval"): (3, 20), ("cpu", "resnet20"): (2, 5),
          ("cuda", "train"): (10, 50), ("cuda", "eval"): (10, 50), ("cuda", "resnet20"): (5, 20)}
CASES = ("train", "eval", "resnet20")
TRAIN_SHAPES = ((1024, 256), (4096, 1))  # (features, batch); --quick: (32, 8), (64, 1)
TRAIN_GOALS = (1.3, 3.0)  # BitLinear train step / nn.Linear's, one per TRAIN_SHAPES entry
EVAL_WIDTH, EVAL_BATCHES = 4096, (1, 16)  # --quick: 64 and (2, 3)
EVAL_GOAL = 1.2  # ternarized eval forward / float, each batch
PACKED_GOAL = 1.5  # float eval forward / packed, batch 1 (a speed-up)
RESNET_GOALS = {"cpu": ("<=", 1.15), "cuda": (">=", 0.9)}  # CPU: time ratio; CUDA: throughput


def precision(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing (fp32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


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


def eval_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One inference forward under ``torch.no_grad``."""

    def step() -> None:
        with torch.no_grad():
            model(x)

    return step


def measure(setup: Setup, case: str, entries: list[tuple[dict[str, Any], Callable[[], None]]]
            ) -> list[dict[str, Any]]:
    """Rows of one case: its ``(row fields, step)`` entries timed interleaved; ratios to the
    first (float) entry."""
    counts = setup.counts(*(1, 1) if setup.quick else COUNTS[(setup.device.type, case)])
    times = time_cases([fn for _, fn in entries], setup.device, **counts)
    rows = []
    for (fields, fn), t in zip(entries, times, strict=True):
        label = f"{case} {fields['layer']} {fields['quant']} {fields['path']} b{fields['batch']}"
        rows.append({"case": case, **fields, **milliseconds(t), "first_call_s": t["first_s"],
                     **counts, **profile_case(setup, label, fn)})
    base = rows[0]["median_ms"]
    for r in rows:
        r["samples_per_s"] = r["batch"] / (r["median_ms"] / 1e3)
        r["time_ratio"] = r["median_ms"] / base
        r["throughput_ratio"] = base / r["median_ms"]
    return rows


def train_rows(setup: Setup, features: int, batch: int) -> list[dict[str, Any]]:
    device = setup.device
    x = torch.randn(batch, features, device=device)
    grad = torch.randn(batch, features, device=device)
    base = {"batch": batch, "features": features}
    torch.manual_seed(0)
    entries = [({**base, "layer": "nn.Linear", "quant": "fp32", "path": "-"},
                linear_step(nn.Linear(features, features, device=device), x, grad, device))]
    paths = [("chimera", "default", None), ("chimera", "eager", False),
             *([("chimera", "compiled", True)] if setup.compile else []),
             ("strict_bitnet", "default", None)]
    for quant, path, compiled in paths:
        torch.manual_seed(0)
        layer = BitLinear(features, features, quant_mode=quant, compiled=compiled).to(device)
        entries.append(({**base, "layer": "BitLinear", "quant": quant, "path": path},
                        linear_step(layer, x, grad, device)))
    return measure(setup, "train", entries)


def mlp(width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width)).to(device).eval()


def eval_rows(setup: Setup, width: int) -> list[dict[str, Any]]:
    """Float, ternarized and packed MLPs in eval, each batch timed as its own case."""
    device = setup.device
    ternary = ternarize(mlp(width, device), "chimera", skip=()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.safetensors"
        export_ternary(ternary, path)
        packed = load_ternary(path, mlp(width, device)).to(device)
    models = [("MLP", "fp32", mlp(width, device)), ("MLP", "chimera", ternary),
              ("packed MLP", "base3", packed)]
    rows = []
    for batch in (2, 3) if setup.quick else EVAL_BATCHES:
        x = torch.randn(batch, width, device=device)
        entries = [({"batch": batch, "features": width, "layer": name, "quant": quant,
                     "path": "default"}, eval_step(model, x)) for name, quant, model in models]
        rows += measure(setup, "eval", entries)
    return rows


def resnet_rows(setup: Setup, batch: int) -> list[dict[str, Any]]:
    device = setup.device
    layout = memory_format(device)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=layout)
    labels = torch.randint(0, 10, (batch,), device=device)
    base = {"batch": batch, "features": None}
    models: list[tuple[str, str, str, Callable[[], nn.Module]]] = [
        ("ResNet20", "fp32", "-", resnet20),
        ("ChimeraResNet20", "chimera", "default", lambda: ChimeraResNet20(mode="chimera"))]
    if setup.compile:
        models.append(("ChimeraResNet20", "chimera", "compiled",
                       lambda: ChimeraResNet20(mode="chimera", quant_config={"compiled": True})))
    entries = []
    for name, quant, path, build in models:
        torch.manual_seed(0)
        model = build().to(device, memory_format=layout)
        entries.append(({**base, "layer": name, "quant": quant, "path": path},
                        resnet_step(model, x, labels, device)))
    return measure(setup, "resnet20", entries)


def _row(rows: list[dict[str, Any]], case: str, **fields: Any) -> dict[str, Any]:
    return next(r for r in rows if r["case"] == case
                and all(r[k] == v for k, v in fields.items()))


def layer_goals(setup: Setup, rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The goals of the ternary-layer table in docs/performance.md that this run measured (default
    paths only)."""
    goals = []
    shapes = dict.fromkeys((r["features"], r["batch"]) for r in rows if r["case"] == "train")
    for (features, batch), limit in zip(shapes, TRAIN_GOALS, strict=False):  # cases run
        r = _row(rows, "train", features=features, batch=batch, quant="chimera", path="default")
        goals.append(goal(f"BitLinear {features}->{features} batch {batch} train step / "
                          f"nn.Linear ({where}, default path)", r["time_ratio"], "<=", limit))
    batches = sorted({r["batch"] for r in rows if r["case"] == "eval"})
    for batch in batches:
        ternary = _row(rows, "eval", batch=batch, layer="MLP", quant="chimera")
        goals.append(goal(f"ternarized MLP eval forward / float, batch {batch}",
                          ternary["time_ratio"], "<=", EVAL_GOAL))
    if batches:
        packed = _row(rows, "eval", batch=batches[0], layer="packed MLP")
        goals.append(goal(f"packed MLP eval speed-up over float (float time / packed), batch "
                          f"{batches[0]}", packed["throughput_ratio"], ">=", PACKED_GOAL))
    if not any(r["case"] == "resnet20" for r in rows):
        return goals
    op, limit = RESNET_GOALS["cuda" if setup.device.type == "cuda" else "cpu"]
    res = _row(rows, "resnet20", quant="chimera", path="default")
    value = res["time_ratio"] if op == "<=" else res["throughput_ratio"]
    kind = "step time" if op == "<=" else "throughput"
    goals.append(goal(f"chimera ResNet-20 {kind} / fp ResNet-20 (batch {res['batch']}, {where}, "
                      "default path)", value, op, limit))
    return goals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``chimera perf layers`` beyond the common ones."""
    parser.add_argument("--cases", default="train,eval,resnet20",
                        help="comma-separated subset of train, eval, resnet20 (default: all)")
    parser.add_argument("--resnet-batch", type=int, default=None,
                        help="ResNet-20 batch (default: 512 on CUDA, 64 on CPU)")



@perf_target("layers", help="ternary layers vs float: BitLinear train steps, eval and packed "
             "inference, ternary ResNet-20 steps", out="perf-layers.jsonl",
             options=add_arguments, positive=("resnet_batch",))
def run(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    cases = [c for c in args.cases.split(",") if c]
    require(cases and set(cases) <= set(CASES), "--cases", args.cases,
            f"a comma-separated subset of {', '.join(CASES)}")
    cuda = setup.device.type == "cuda"
    rows: list[dict[str, Any]] = []
    if "train" in cases:
        for features, batch in ((32, 8), (64, 1)) if setup.quick else TRAIN_SHAPES:
            rows += train_rows(setup, features, batch)
    if "eval" in cases:
        rows += eval_rows(setup, 64 if setup.quick else EVAL_WIDTH)
    if "resnet20" in cases:
        rows += resnet_rows(setup, 2 if setup.quick else (args.resnet_batch or (512 if cuda
                                                                                 else 64)))
    where = "cuda bf16 channels_last" if cuda else "cpu fp32"
    columns = [("case", lambda r: r["case"]), ("layer", lambda r: r["layer"]),
               ("quant", lambda r: r["quant"]), ("path", lambda r: r["path"]),
               ("features", lambda r: fmt(r["features"], "d")),
               ("batch", lambda r: r["batch"]), ("ms", lambda r: fmt(r["median_ms"])),
               ("samples/s", lambda r: fmt(r["samples_per_s"], ".0f")),
               ("x float (time)", lambda r: fmt(r["time_ratio"])),
               ("1st call s", lambda r: fmt(r["first_call_s"]))]
    notes = [f"settings: {where} (eval: fp32, no_grad); ratios are time ratios to the float row "
             "of the same case and batch"]
    report("perf-layers", setup, rows, columns, layer_goals(setup, rows, where), notes)
    return rows
