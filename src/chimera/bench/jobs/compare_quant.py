"""``chimera compare-quant``: the same task and budget trained with each quantizer.

The recipes are those of the packaged bench suite's ``quant`` section
(``chimera/bench/suites/bench.toml``), one per quantizer:

- ``fp32``: AdamW, no quantization;
- ``strict_bitnet``: AdamW, BitNet b1.58 absmean ternary hidden layers (first/last in fp32);
- ``chimera``: AdamW, dynamic-threshold ternary hidden layers, the target-bits controller on the
  sparse branch at 1.32 bits (target zero ratio 0.630), updated every batch, moving alpha_target;
- ``int_ternary``: integer-ternary hidden layers trained by ScaledOptum alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from chimera.bench.jobs.bench import QUANT_GRID, bench_suite
from chimera.bench.suite.schema import load_suite
from chimera.data import load_task
from chimera.run.records import RecordWriter
from chimera.run.spec import RunSpec
from chimera.run.trainer import train


def quant_recipes() -> dict[str, RunSpec]:
    """The bench suite's ``quant`` section: one spec (its first seed) per quantizer."""
    section = next(g for g in load_suite(bench_suite()).grids if g.name == QUANT_GRID)
    recipes: dict[str, RunSpec] = {}
    for spec in section.specs:
        recipes.setdefault(spec.quantizer, spec)
    return recipes


def quant_specs(
    quantizers: Sequence[str], seeds: Sequence[int], *, task: str | None = None,
    model: str | None = None, epochs: int | None = None,
) -> list[RunSpec]:
    """One spec per (quantizer, seed) from :func:`quant_recipes`, on ``task`` / ``model`` /
    ``epochs`` when given (the recipe's otherwise); unknown quantizers are rejected before
    anything runs."""
    recipes = quant_recipes()
    unknown = [q for q in quantizers if q not in recipes]
    if unknown or not quantizers:
        raise ValueError(f"unknown quantizer {', '.join(map(repr, unknown)) or '(none given)'} "
                         f"for compare-quant; known: {', '.join(recipes)}")
    changes = {k: v for k, v in (("task", task), ("model", model), ("epochs", epochs))
               if v is not None}
    return [dataclasses.replace(recipes[q], seed=seed, **changes)
            for q in quantizers for seed in seeds]


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
