"""Expansion of a validated suite (:mod:`chimera.bench.suite.schema`) into its sections: the
``[[grid]]`` tables inherit the top-level keys by groups, every grid becomes the run specs of
tasks x models x optimizers x quantizers x rules x seeds, and every configuration is built once
on a probe model, before anything runs (docs/suites.md).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from chimera.bench.suite.sections import (
    GridSection,
    ParamRange,
    StressSection,
    Suite,
    ToyLQSection,
    TuneSection,
)
from chimera.bench.workers import Resources
from chimera.models import build_model
from chimera.nn.quantize import AlphaControl, quantize_, quantizer_config
from chimera.optim import build_optimizer
from chimera.run.build import build_run_rule
from chimera.run.spec import RunSpec

if TYPE_CHECKING:
    from chimera.bench.suite.schema import SuiteTable, TuneTable

BUDGET_KEYS = ("epochs", "batch_size", "eval_batch_size", "lr_schedule", "device", "log_every",
               "precision", "max_batches", "eval_max_batches")
# A [[grid]] that sets any key of a group replaces the whole top-level group: a choice and its
# hyper-parameters go together. ``name`` and ``title`` are never inherited.
INHERITED_GROUPS = (
    ("task", "tasks"),
    ("model", "models", "model_hparams"),
    ("optimizer", "optimizers", "optimizer_hparams"),
    ("quantizer", "quantizers", "quant_hparams", "controller"),
    ("rule", "rules", "rule_hparams"),
)
TUNE_SEED_BASE = 1000  # default tuning seeds: 1000, 1001, ... (one per top-level seed)
PROBE_SHAPES = ((40,), (3, 8, 8))  # probe inputs for the real model: a sequence, then an image


# --- probes ------------------------------------------------------------------------------------

def _probe_model(spec: RunSpec) -> nn.Module:
    """The run's model built on the first probe input it accepts (no task data is loaded)."""
    error = ValueError(f"model '{spec.model}' takes none of the probe inputs {PROBE_SHAPES}")
    for shape in PROBE_SHAPES:
        try:
            return build_model(spec.model, shape, 2, **spec.model_hparams)
        except ValueError as e:
            error = e
    raise error


def _probe(spec: RunSpec) -> None:
    """Build the run's model with its quantizer, optimizer, controller and learning rule on a
    probe input: bad hyper-parameter names or values, a skip rule that converts nothing, or a
    rule on a model without stem / blocks / head raise here, before any run starts."""
    try:
        with torch.random.fork_rng(devices=[]):
            model = quantize_(_probe_model(spec), spec.quant_config)
            opt = build_optimizer(spec.optimizer, model, **spec.optimizer_hparams)
            if spec.controller_config is not None:
                AlphaControl(model, spec.controller_config)
            build_run_rule(spec, model, opt, num_classes=2, total_steps=1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"run {spec.run_id}: {e}") from None


# --- grids -------------------------------------------------------------------------------------

def _one_or_many(grid: dict[str, Any], one: str, many: str) -> list[Any]:
    """``grid[one]`` as a one-item list, or the list ``grid[many]``; exactly one must be set."""
    if (one in grid) == (many in grid):
        raise ValueError(f"set exactly one of '{one}' and '{many}'")
    return [grid[one]] if one in grid else list(grid[many])


def _named(
    grid: dict[str, Any], one: str, many: str, hparams_key: str
) -> list[tuple[str, dict[str, Any]]]:
    """(name, hyper-parameters) of every entry: names share ``hparams_key``, tables carry
    their own."""
    entries = _one_or_many(grid, one, many)
    if hparams_key in grid and not all(isinstance(e, str) for e in entries):
        raise ValueError(f"{hparams_key} goes with names; in {many} tables put the "
                         "hyper-parameters in each table")
    shared = grid.get(hparams_key, {})
    return [(e, dict(shared)) if isinstance(e, str) else (e.name, e.hparams) for e in entries]


def _quantizers(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """The RunSpec quantizer fields of every entry: names (default ``fp32``) share the grid's
    ``quant_hparams`` and ``controller``; ``[[quantizers]]`` tables carry their own."""
    if "quantizer" not in grid and "quantizers" not in grid:
        grid = {**grid, "quantizer": "fp32"}
    out = []
    for i, e in enumerate(_one_or_many(grid, "quantizer", "quantizers")):
        if isinstance(e, str):
            key, fields = "quant_hparams", {"quantizer": e, "controller": grid.get("controller"),
                                            "quant_hparams": grid.get("quant_hparams", {})}
        else:
            key, fields = f"quantizers.{i}.quant_hparams", {
                "quantizer": e.quantizer, "quant_hparams": e.quant_hparams,
                "controller": e.controller}
        try:
            quantizer_config(fields["quantizer"], **fields["quant_hparams"])
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
        out.append(fields)
    return out


def expand_grid(grid: dict[str, Any]) -> list[RunSpec]:
    """The run specs of one grid (its validated keys, top-level ones already inherited), each
    configuration probed once."""
    tasks = _one_or_many(grid, "task", "tasks")
    models = _one_or_many(grid, "model", "models")
    if "rule" not in grid and "rules" not in grid:
        grid = {**grid, "rule": "backprop"}
    rules = _named(grid, "rule", "rules", "rule_hparams")
    optimizers = _named(grid, "optimizer", "optimizers", "optimizer_hparams")
    budget = {k: grid[k] for k in BUDGET_KEYS if k in grid}
    product = itertools.product(tasks, models, optimizers, _quantizers(grid), rules,
                                grid.get("seeds", [0]))
    specs, probed = [], set()
    for task, model, (opt, opt_hp), quant, (rule, rule_hp), seed in product:
        spec = RunSpec(task=task, model=model, optimizer=opt, optimizer_hparams=opt_hp,
                       model_hparams=grid.get("model_hparams", {}), rule=rule,
                       rule_hparams=rule_hp, seed=seed, **quant, **budget)
        if spec.config_id not in probed:
            _probe(spec)
            probed.add(spec.config_id)
        specs.append(spec)
    return specs


def inherit(defaults: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any]:
    """``grid`` over the top-level ``defaults``: a group set in the grid replaces the group."""
    merged = dict(defaults)
    for group in INHERITED_GROUPS:
        if any(k in grid for k in group):
            for k in group:
                merged.pop(k, None)
    return {**merged, **grid}


def grid_label(where: str, number: int, name: Any) -> str:
    """How errors name the ``number``-th ``[[grid]]`` table of ``where``."""
    return f"{where} [[grid]] #{number}" + (f" '{name}'" if isinstance(name, str) else "")


def _grid_sections(table: SuiteTable, where: str) -> list[GridSection]:
    """``[[grid]]`` tables grouped by name (first-seen order), or the top level as one grid."""
    defaults = table.set_fields()
    if table.grid is None:
        if "task" not in defaults and "tasks" not in defaults and (
                table.stress is not None or table.toy_lq is not None):
            return []
        try:
            return [GridSection("", table.title, tuple(expand_grid(defaults)))]
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    sections: dict[str, tuple[str | None, list[RunSpec]]] = {}
    for i, grid in enumerate(table.grid, 1):
        label = grid_label(where, i, grid.name)
        title, specs = sections.setdefault(grid.name, (grid.title, []))
        try:
            if grid.title is not None and grid.title != title:
                raise ValueError(f"grids named '{grid.name}' have different titles")
            specs += expand_grid(inherit(defaults, grid.set_fields()))
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
    return [GridSection(name, title or name, tuple(specs))
            for name, (title, specs) in sections.items()]


# --- [tune] ------------------------------------------------------------------------------------

def _tune_section(tune: TuneTable, default_seeds: int) -> TuneSection:
    """The ``[tune]`` table with addresses as ``TABLE.KEY`` (a bare key: optimizer_hparams)."""
    params = {}
    for key, values in tune.params.items():
        address = key if "." in key else f"optimizer_hparams.{key}"
        if isinstance(values, list):
            params[address] = tuple(values)
        else:
            params[address] = ParamRange(*(values.log or values.linear), log=bool(values.log),
                                         num=values.num)
    seeds = tune.seeds or [TUNE_SEED_BASE + i for i in range(default_seeds)]
    return TuneSection(params=params, sampler=tune.sampler, trials=tune.trials,
                       seeds=tuple(seeds), metric=tune.metric, sampler_seed=tune.sampler_seed)


def _probe_tune(space: TuneSection, specs: list[RunSpec]) -> None:
    """Every candidate of every address (the ends of a continuous range), the others at their
    first candidate, on every configuration: a value a configuration refuses raises here."""
    firsts = {a: (space.choices(a) or (space.params[a].low,))[0] for a in space.params}
    bases: dict[str, RunSpec] = {}
    for spec in specs:
        bases.setdefault(spec.config_id, spec)
    probed = set()
    for spec in bases.values():
        for address, values in space.params.items():
            if isinstance(values, ParamRange):
                values = space.choices(address) or (values.low, values.high)
            for value in values:
                try:
                    tuned = space.apply(spec, {**firsts, address: value})
                    if tuned.config_id not in probed:
                        _probe(tuned)
                        probed.add(tuned.config_id)
                except ValueError as e:
                    raise ValueError(f"params.{address} = {value!r}: {e}") from None


def _check_tune(space: TuneSection, suite: Suite) -> None:
    """Tuning needs training runs, on seeds that no grid reports on, and candidates every
    configuration accepts."""
    if not suite.specs:
        raise ValueError("a [tune] table needs training grids to tune")
    reporting = sorted({s.seed for s in suite.specs} & set(space.seeds))
    if reporting:
        raise ValueError(f"seeds: tuning seeds {reporting} are also reporting seeds of a grid; "
                         "tune on other seeds")
    _probe_tune(space, suite.specs)


def expand(table: SuiteTable, where: str) -> Suite:
    """The sections of the validated suite ``table`` (``where`` names it in errors); a grid
    configuration that fails its probe build, a suite without runs and a section that names the
    same run twice raise ``ValueError``."""
    seeds = tuple(table.seeds or (0,))
    stress = toy_lq = None
    if table.stress is not None:
        s = table.stress
        stress = StressSection(title=s.title, seeds=tuple(s.seeds or seeds), steps=s.steps,
                               problems=tuple(s.problems), configs=tuple(s.configs),
                               options=s.options())
    if table.toy_lq is not None:
        t = table.toy_lq
        toy_lq = ToyLQSection(title=t.title, seeds=tuple(t.seeds or seeds), steps=t.steps,
                              rules=tuple(t.rules))
    tune = None if table.tune is None else _tune_section(table.tune, len(seeds))
    resources = None if table.resources is None else Resources(**table.resources.model_dump())
    suite = Suite(name=table.name, grids=tuple(_grid_sections(table, where)), stress=stress,
                  toy_lq=toy_lq, tune=tune, resources=resources)
    if not suite.specs and suite.stress is None and suite.toy_lq is None:
        raise ValueError(f"{where} declares no runs")
    for grid in suite.grids:  # sections write to their own folders; a run may recur across
        ids = [s.run_id for s in grid.specs]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            section = f" (section '{grid.name}')" if grid.name else ""
            raise ValueError(f"{where}{section} declares the same run twice: {twice}")
    if tune is not None:
        try:
            _check_tune(tune, suite)
        except ValueError as e:
            raise ValueError(f"{where} [tune]: {e}") from None
    return suite
