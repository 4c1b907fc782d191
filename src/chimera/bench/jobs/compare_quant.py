"""``chimera compare-quant``: the same task and budget trained with each quantizer.

Recipes (one budget for all quantizers: the MNIST-1D recipe of ``chimera bench``):

- ``fp32``: AdamW, no quantization;
- ``strict_bitnet``: AdamW, BitNet b1.58 absmean ternary hidden layers (first/last in fp32);
- ``chimera``: AdamW, dynamic-threshold ternary hidden layers, the target-bits controller on the
  sparse branch at 1.32 bits (target zero ratio 0.630), updated every batch, moving alpha_target;
- ``int_ternary``: integer-ternary hidden layers trained by ScaledOptum alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chimera.data import load_task
from chimera.registry import Registry
from chimera.run.records import RecordWriter
from chimera.run.spec import RunSpec
from chimera.run.trainer import train

QUANT_RECIPES: Registry[dict[str, Any]] = Registry("quantizer")
_ADAMW = {"optimizer": "adamw", "optimizer_hparams": {"lr": 2e-2}}
QUANT_RECIPES.register("fp32")({**_ADAMW, "quantizer": "fp32"})
QUANT_RECIPES.register("strict_bitnet")({**_ADAMW, "quantizer": "strict_bitnet"})
QUANT_RECIPES.register("chimera")({
    **_ADAMW, "quantizer": "chimera",
    "controller": {"target_bits": 1.32, "branch": "sparse", "frequency": "batch",
                   "affects": "alpha_target"},
})
QUANT_RECIPES.register("int_ternary")({
    "optimizer": "scaled_optum", "quantizer": "int_ternary",
    "optimizer_hparams": {"lr": 1e-2},
})


def quant_specs(
    task: str, model: str, quantizers: Sequence[str], seeds: Sequence[int], epochs: int,
    batch_size: int = 100, lr_schedule: str = "cosine",
) -> list[RunSpec]:
    """One spec per (quantizer, seed); unknown quantizers are rejected before anything runs."""
    recipes = {q: QUANT_RECIPES.get(q) for q in quantizers}
    return [
        RunSpec(task=task, model=model, seed=seed, epochs=epochs, batch_size=batch_size,
                lr_schedule=lr_schedule, **recipes[q])
        for q in quantizers
        for seed in seeds
    ]


def run_compare_quant(
    specs: Sequence[RunSpec], writer: RecordWriter | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Train every spec (the task is loaded once); returns spec fields merged with final metrics."""
    data = {}
    finals = []
    for spec in specs:
        if spec.task not in data:
            data[spec.task] = load_task(spec.task)
        finals.append({**spec.to_dict(),
                       **train(spec, writer, data=data[spec.task], progress=progress)})
    return finals
