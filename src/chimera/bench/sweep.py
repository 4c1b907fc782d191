"""``chimera sweep``: a TOML suite declares a grid of runs; every run gets its own record file and
checkpoint, and a rerun skips finished runs and resumes interrupted ones (docs/suites.md).

The grid is tasks x models x optimizers x quantizers x seeds, with one shared budget. The whole
suite is validated (keys, registry names, values) before anything runs.
"""

from __future__ import annotations

import inspect
import itertools
import os
import tomllib
from pathlib import Path
from typing import Any

from torch import nn

from chimera.bench.compare_quant import quant_table
from chimera.bench.main import classification_table
from chimera.bench.pool import run_specs
from chimera.bench.quant_control import AlphaControl, quantize_model
from chimera.bench.spec import RunSpec
from chimera.data import TASKS
from chimera.models import MODELS
from chimera.nn.convert import TERNARY_CONVERTERS
from chimera.optim import OPTIMIZERS, build_optimizer

RULES = ("backprop",)  # the learning rules the trainer runs
BUDGET_KEYS = ("epochs", "batch_size", "eval_batch_size", "lr_schedule", "device", "log_every")
SUITE_KEYS = (
    "name", "task", "tasks", "model", "models", "model_hparams", "optimizer", "optimizer_hparams",
    "optimizers", "quantizer", "quantizers", "quant_hparams", "controller", "rule", "seeds",
    *BUDGET_KEYS,
)
QUANTIZER_KEYS = ("mode", "quant_hparams", "controller")


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {', '.join(allowed)}")


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a table, got {value!r}")
    return value


def _one_or_many(suite: dict[str, Any], one: str, many: str) -> list[Any]:
    """``suite[one]`` as a one-item list, or the list ``suite[many]``; exactly one must be set."""
    if (one in suite) == (many in suite):
        raise ValueError(f"set exactly one of '{one}' and '{many}'")
    if one in suite:
        return [suite[one]]
    values = suite[many]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{many} must be a non-empty list, got {values!r}")
    return values


def _names(suite: dict[str, Any], one: str, many: str, registry: Any) -> list[str]:
    names = _one_or_many(suite, one, many)
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{many} entries must be names (strings), got {name!r}")
        registry.get(name)  # unknown names raise, listing the known ones
    return names


def _optimizers(suite: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``optimizer`` + ``optimizer_hparams``, or ``[[optimizers]]`` tables ``{name, <hparams>}``
    (or plain names)."""
    if "optimizers" in suite and "optimizer_hparams" in suite:
        raise ValueError("optimizer_hparams goes with 'optimizer'; in [[optimizers]] put the "
                         "hyper-parameters in each table")
    out = []
    for entry in _one_or_many(suite, "optimizer", "optimizers"):
        if isinstance(entry, str):
            hparams = _table(suite.get("optimizer_hparams", {}), "optimizer_hparams")
            entry = {"name": entry, **hparams}
        entry = dict(_table(entry, "an [[optimizers]] entry"))
        name = entry.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"every [[optimizers]] table needs name = \"...\", got {entry!r}")
        OPTIMIZERS.get(name)
        out.append((name, entry))
    return out


def _quantizers(suite: dict[str, Any]) -> list[dict[str, Any]]:
    """``quantizer``/``quantizers`` as names (sharing the top-level ``quant_hparams`` and
    ``controller``) or tables ``{mode, quant_hparams, controller}``."""
    if "quantizer" not in suite and "quantizers" not in suite:
        suite = {**suite, "quantizer": "fp32"}
    out = []
    for entry in _one_or_many(suite, "quantizer", "quantizers"):
        if isinstance(entry, str):
            entry = {"mode": entry, "quant_hparams": suite.get("quant_hparams", {}),
                     "controller": suite.get("controller")}
        entry = _table(entry, "a [[quantizers]] entry")
        _check_keys(entry, QUANTIZER_KEYS, "a [[quantizers]] table")
        mode = entry.get("mode")
        if mode != "fp32":
            TERNARY_CONVERTERS.get(mode)
        out.append({"quantizer": mode,
                    "quant_hparams": _table(entry.get("quant_hparams", {}), "quant_hparams"),
                    "controller": entry.get("controller")})
    return out


def _seeds(suite: dict[str, Any]) -> list[int]:
    seeds = suite.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(type(s) is int and s >= 0 for s in seeds)):
        raise ValueError(f"seeds must be a non-empty list of distinct non-negative integers, "
                         f"got {seeds!r}")
    return seeds


def _check_kwargs(fn: Any, kwargs: dict[str, Any], what: str) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n in params if n not in ("self", "input_shape", "num_classes")]
    _check_keys(kwargs, tuple(allowed), what)


def _probe(spec: RunSpec) -> None:
    """Build the run's quantizer, optimizer and controller on a tiny MLP: bad hyper-parameter
    names or values raise here, before any run starts."""
    probe = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    hp = {k: v for k, v in spec.quant_hparams.items() if k != "skip"}
    where = f"run {spec.run_id}"
    try:
        model = quantize_model(probe, spec.quantizer, hp)
        build_optimizer(spec.optimizer, model, **spec.optimizer_hparams)
        if spec.controller is not None:
            AlphaControl(model, _table(spec.controller, "controller"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def expand_suite(suite: dict[str, Any], where: str = "suite") -> list[RunSpec]:
    """The run specs of a parsed suite, validated: unknown keys, registry names and impossible
    values raise ``ValueError`` naming what is wrong."""
    _check_keys(suite, SUITE_KEYS, where)
    tasks = _names(suite, "task", "tasks", TASKS)
    models = _names(suite, "model", "models", MODELS)
    model_hparams = _table(suite.get("model_hparams", {}), "model_hparams")
    for model in models:
        _check_kwargs(MODELS.get(model), model_hparams, f"model_hparams of model '{model}'")
    rule = suite.get("rule", "backprop")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    budget = {k: suite[k] for k in BUDGET_KEYS if k in suite}
    specs = []
    grid = itertools.product(tasks, models, _optimizers(suite), _quantizers(suite), _seeds(suite))
    for task, model, (opt, opt_hp), quant, seed in grid:
        spec = RunSpec(task=task, model=model, optimizer=opt, optimizer_hparams=opt_hp,
                       model_hparams=model_hparams, rule=rule, seed=seed, **quant, **budget)
        _probe(spec)
        specs.append(spec)
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where} declares the same run twice: {sorted(ids)}")
    return specs


def load_suite(path: str | os.PathLike) -> list[RunSpec]:
    """Read a TOML suite file and expand it into validated run specs (see :func:`expand_suite`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"suite file not found: {path}")
    try:
        suite = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    return expand_suite(suite, where=str(path))


def summary_table(finals: list[dict[str, Any]]) -> str:
    """The quantizer table when any run is ternary, else the classification table."""
    if any(f["quantizer"] != "fp32" for f in finals):
        return quant_table(finals)
    return classification_table(finals)


def run_sweep(
    path: str | os.PathLike, out: str | os.PathLike, workers: int | None = None,
    progress: bool = True,
) -> str:
    """Run (or finish) the suite at ``path`` into ``out``; returns the summary table, which is
    also written to ``out/summary.md``."""
    specs = load_suite(path)
    finals = run_specs(specs, out, workers, progress, desc=Path(path).stem, resume=True)
    table = summary_table(finals)
    (Path(out) / "summary.md").write_text(table + "\n", encoding="utf-8")
    return table
