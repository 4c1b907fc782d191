"""``chimera sweep``: a TOML suite declares grids of training runs, and optionally the stress
problems and the toy LQ check; every training run gets its own record file and checkpoint, and a
rerun skips finished runs and resumes interrupted ones (docs/suites.md).

A grid is tasks x models x optimizers x quantizers x rules x seeds, with one shared budget. A
suite is one grid (its top level), or several ``[[grid]]`` tables that inherit the top-level
keys; grids sharing a ``name`` form one section (one folder, one summary table). The whole suite
is validated (keys, registry names, values, a probe build of every configuration) before
anything runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import nn

from chimera.bench.jobs.stress import STRESS_CONFIGS, run_stress, stress_table
from chimera.bench.jobs.toy_lq import DEFAULT_VARIANTS, TOY_VARIANTS, run_toy_lq, toy_lq_table
from chimera.bench.report.tables import runs_table
from chimera.bench.suite.execute import Call, resolve_workers, run_calls, spec_call
from chimera.data import TASKS
from chimera.data.stress import STRESS
from chimera.models import MODELS, build_model
from chimera.nn.quantize import QUANTIZERS, AlphaControl, quantize_
from chimera.optim import OPTIMIZERS, build_optimizer
from chimera.rules import RULES, build_rule
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec

BUDGET_KEYS = ("epochs", "batch_size", "eval_batch_size", "lr_schedule", "device", "log_every",
               "precision")
GRID_KEYS = (
    "name", "task", "tasks", "model", "models", "model_hparams", "optimizer", "optimizer_hparams",
    "optimizers", "quantizer", "quantizers", "quant_hparams", "controller", "rule", "rules",
    "rule_hparams", "seeds", *BUDGET_KEYS, "title",
)
SUITE_KEYS = (*GRID_KEYS, "grid", "stress", "toy_lq")
QUANTIZER_KEYS = ("mode", "quant_hparams", "controller")
# A [[grid]] that sets any key of a group replaces the whole top-level group: a choice and its
# hyper-parameters go together. ``name`` and ``title`` are never inherited.
INHERITED_GROUPS = (
    ("task", "tasks"),
    ("model", "models", "model_hparams"),
    ("optimizer", "optimizers", "optimizer_hparams"),
    ("quantizer", "quantizers", "quant_hparams", "controller"),
    ("rule", "rules", "rule_hparams"),
)
SECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
PROBE_SHAPES = ((40,), (3, 8, 8))  # probe inputs for the real model: a sequence, then an image


# --- validation helpers ------------------------------------------------------------------------

def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {', '.join(allowed)}")


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a table, got {value!r}")
    return value


def _one_or_many(grid: dict[str, Any], one: str, many: str) -> list[Any]:
    """``grid[one]`` as a one-item list, or the list ``grid[many]``; exactly one must be set."""
    if (one in grid) == (many in grid):
        raise ValueError(f"set exactly one of '{one}' and '{many}'")
    if one in grid:
        return [grid[one]]
    values = grid[many]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{many} must be a non-empty list, got {values!r}")
    return values


def _registered(name: Any, registry: Any, key: str) -> str:
    """``name``, checked against ``registry``; the error names the suite ``key``."""
    if not isinstance(name, str):
        raise ValueError(f"{key} entries must be names (strings), got {name!r}")
    try:
        registry.get(name)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    return name


def _names(grid: dict[str, Any], one: str, many: str, registry: Any) -> list[str]:
    key = one if one in grid else many
    return [_registered(n, registry, key) for n in _one_or_many(grid, one, many)]


def _named_entries(
    grid: dict[str, Any], one: str, many: str, hparams_key: str, registry: Any
) -> list[tuple[str, dict[str, Any]]]:
    """``one`` + ``hparams_key``, or ``many`` as names (sharing ``hparams_key``) or as tables
    ``{name, <hyper-parameters>}``: a list of (name, hyper-parameters)."""
    entries = _one_or_many(grid, one, many)
    if hparams_key in grid and any(isinstance(e, dict) for e in entries):
        raise ValueError(f"{hparams_key} goes with names; in {many} tables put the "
                         "hyper-parameters in each table")
    shared = _table(grid.get(hparams_key, {}), hparams_key)
    key = one if one in grid else many
    out = []
    for entry in entries:
        entry = {"name": entry, **shared} if isinstance(entry, str) else dict(
            _table(entry, f"an entry of {many}"))
        name = entry.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"every table of {many} needs name = \"...\", got {entry!r}")
        out.append((_registered(name, registry, key), entry))
    return out


def _quantizers(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """``quantizer``/``quantizers`` as names (sharing the grid's ``quant_hparams`` and
    ``controller``) or tables ``{mode, quant_hparams, controller}``."""
    if "quantizer" not in grid and "quantizers" not in grid:
        grid = {**grid, "quantizer": "fp32"}
    out = []
    for entry in _one_or_many(grid, "quantizer", "quantizers"):
        if isinstance(entry, str):
            entry = {"mode": entry, "quant_hparams": grid.get("quant_hparams", {}),
                     "controller": grid.get("controller")}
        entry = _table(entry, "a [[quantizers]] entry")
        _check_keys(entry, QUANTIZER_KEYS, "a [[quantizers]] table")
        mode = entry.get("mode")
        QUANTIZERS.get(mode)
        out.append({"quantizer": mode,
                    "quant_hparams": _table(entry.get("quant_hparams", {}), "quant_hparams"),
                    "controller": entry.get("controller")})
    return out


def _seeds(table: dict[str, Any]) -> list[int]:
    seeds = table.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(type(s) is int and s >= 0 for s in seeds)):
        raise ValueError(f"seeds must be a non-empty list of distinct non-negative integers, "
                         f"got {seeds!r}")
    return seeds


def _steps(table: dict[str, Any], where: str) -> int:
    steps = table["steps"]
    if type(steps) is not int or steps < 1:
        raise ValueError(f"steps in {where} must be a positive integer, got {steps!r}")
    return steps


def _check_kwargs(fn: Any, kwargs: dict[str, Any], what: str) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n in params if n not in ("self", "input_shape", "num_classes")]
    _check_keys(kwargs, tuple(allowed), what)


def _rule_probe(spec: RunSpec) -> None:
    """Build the run's learning rule on its own model (the model's structure matters: a rule
    needs stem / blocks / head), built on the first probe input it accepts."""
    error = ValueError(f"model '{spec.model}' takes none of the probe inputs {PROBE_SHAPES}")
    for shape in PROBE_SHAPES:
        try:
            model = build_model(spec.model, shape, 2, **spec.model_hparams)
            break
        except ValueError as e:
            error = e
    else:
        raise error
    build_rule(spec.rule, model, None, loss_fn=F.cross_entropy, out_dim=2, total_steps=1,
               **spec.rule_hparams)


def _probe(spec: RunSpec) -> None:
    """Build the run's quantizer, optimizer and controller on a tiny MLP, and its learning rule
    on its model: bad hyper-parameter names or values, or a rule on a model without stem /
    blocks / head, raise here, before any run starts."""
    probe = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    try:
        model = quantize_(probe, dataclasses.replace(spec.quant_config, skip=()))
        build_optimizer(spec.optimizer, model, **spec.optimizer_hparams)
        if spec.controller is not None:
            AlphaControl(model, _table(spec.controller, "controller"))
        if spec.rule != "backprop":
            _rule_probe(spec)
        elif spec.rule_hparams:
            raise ValueError(f"rule 'backprop' takes no rule_hparams, got {spec.rule_hparams}")
    except (TypeError, ValueError) as e:
        raise ValueError(f"run {spec.run_id}: {e}") from None


# --- sections ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridSection:
    """Training runs written to ``<out>/<name>/`` (``name`` '' for a one-grid suite: ``<out>``)."""

    name: str
    title: str | None
    specs: tuple[RunSpec, ...]

    def heading(self) -> str | None:
        """``title (budget)``, or None for an untitled one-grid suite."""
        if self.title is None:
            return None

        def values(field: str) -> str:
            return "/".join(str(v) for v in dict.fromkeys(getattr(s, field) for s in self.specs))

        epochs = values("epochs")
        parts = [f"{epochs} epoch{'s' * (epochs != '1')}", f"batch {values('batch_size')}",
                 f"{values('lr_schedule')} lr"]
        if values("precision") != "fp32":
            parts.append(values("precision"))
        parts.append(f"seeds {sorted({s.seed for s in self.specs})}")
        return f"{self.title} ({', '.join(parts)})"


@dataclass(frozen=True)
class OneFileSection:
    """Generated problems run as one job into one record file (rewritten when rerun)."""

    title: str
    seeds: tuple[int, ...]
    steps: int

    file = ""

    def run(self, path: str) -> list[dict[str, Any]]:
        """Run the section into a fresh ``path``; returns its final records."""
        Path(path).unlink(missing_ok=True)
        with RecordWriter(path) as writer:
            return self._run(writer)

    def finished(self, path: Path) -> list[dict[str, Any]] | None:
        """The final records of a complete earlier run of this section in ``path``, else None."""
        finals = read_records(path, record_type="final") if path.exists() else []
        same = Counter(self._key(f) for f in finals) == Counter(self._expected())
        return finals if same else None

    def heading(self) -> str:
        return f"{self.title} ({self.steps} steps, seeds {list(self.seeds)})"

    def _run(self, writer: RecordWriter) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _key(self, final: dict[str, Any]) -> tuple:
        raise NotImplementedError

    def _expected(self) -> list[tuple]:
        raise NotImplementedError

    def table(self, finals: list[dict[str, Any]]) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class StressSection(OneFileSection):
    """``[stress]``: problems x optimizer configurations x seeds (``chimera stress``)."""

    problems: tuple[str, ...] = ()
    configs: tuple[str, ...] = ()

    file = "stress.jsonl"

    def _run(self, writer: RecordWriter) -> list[dict[str, Any]]:
        return run_stress(self.problems, self.configs, seeds=self.seeds, steps=self.steps,
                          writer=writer, progress=False)

    def _key(self, final: dict[str, Any]) -> tuple:
        return final.get("problem"), final.get("config"), final.get("seed"), final.get("steps")

    def _expected(self) -> list[tuple]:
        return [(*k, self.steps) for k in itertools.product(self.problems, self.configs,
                                                             self.seeds)]

    def table(self, finals: list[dict[str, Any]]) -> str:
        return stress_table(finals)


@dataclass(frozen=True)
class ToyLQSection(OneFileSection):
    """``[toy_lq]``: the rules' credit quality on the toy LQ problem (``chimera toy-lq``)."""

    rules: tuple[str, ...] = ()

    file = "toy_lq.jsonl"

    def _run(self, writer: RecordWriter) -> list[dict[str, Any]]:
        return run_toy_lq(list(self.rules), seeds=list(self.seeds), steps=self.steps,
                          writer=writer, progress=False)

    def _key(self, final: dict[str, Any]) -> tuple:
        return final.get("variant"), final.get("seed"), final.get("steps")

    def _expected(self) -> list[tuple]:
        return [(r, s, self.steps) for r in self.rules for s in self.seeds]

    def table(self, finals: list[dict[str, Any]]) -> str:
        return toy_lq_table(finals)


@dataclass(frozen=True)
class Suite:
    """A validated suite: its grid sections and optional stress and toy LQ sections."""

    name: str | None
    grids: tuple[GridSection, ...]
    stress: StressSection | None = None
    toy_lq: ToyLQSection | None = None

    @property
    def specs(self) -> list[RunSpec]:
        """Every training run of the suite, in order."""
        return [s for g in self.grids for s in g.specs]


# --- expansion ---------------------------------------------------------------------------------

def _expand_grid(grid: dict[str, Any]) -> list[RunSpec]:
    """The run specs of one grid table (defaults already merged in), each probed once per
    configuration."""
    tasks = _names(grid, "task", "tasks", TASKS)
    models = _names(grid, "model", "models", MODELS)
    model_hparams = _table(grid.get("model_hparams", {}), "model_hparams")
    for model in models:
        _check_kwargs(MODELS.get(model), model_hparams, f"model_hparams of model '{model}'")
    if "rule" not in grid and "rules" not in grid:
        grid = {**grid, "rule": "backprop"}
    rules = _named_entries(grid, "rule", "rules", "rule_hparams", RULES)
    optimizers = _named_entries(grid, "optimizer", "optimizers", "optimizer_hparams", OPTIMIZERS)
    budget = {k: grid[k] for k in BUDGET_KEYS if k in grid}
    specs, probed = [], set()
    product = itertools.product(tasks, models, optimizers, _quantizers(grid), rules, _seeds(grid))
    for task, model, (opt, opt_hp), quant, (rule, rule_hp), seed in product:
        spec = RunSpec(task=task, model=model, optimizer=opt, optimizer_hparams=opt_hp,
                       model_hparams=model_hparams, rule=rule, rule_hparams=rule_hp, seed=seed,
                       **quant, **budget)
        if spec.config_id not in probed:
            _probe(spec)
            probed.add(spec.config_id)
        specs.append(spec)
    return specs


def _inherit(defaults: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any]:
    """``grid`` over the top-level ``defaults``: a group set in the grid replaces the group."""
    merged = {k: v for k, v in defaults.items() if k in GRID_KEYS and k not in ("name", "title")}
    for group in INHERITED_GROUPS:
        if any(k in grid for k in group):
            for k in group:
                merged.pop(k, None)
    return {**merged, **grid}


def _grid_sections(data: dict[str, Any], where: str) -> list[GridSection]:
    """``[[grid]]`` tables grouped by name (first-seen order), or the top level as one grid."""
    if "grid" not in data:
        if "task" not in data and "tasks" not in data and ("stress" in data or "toy_lq" in data):
            return []
        return [GridSection("", data.get("title"), tuple(_expand_grid(data)))]
    tables = data["grid"]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"grid in {where} must be a non-empty array of tables ([[grid]])")
    sections: dict[str, tuple[str | None, list[RunSpec]]] = {}
    for i, table in enumerate(tables, 1):
        name = table.get("name")
        label = f"{where} [[grid]] #{i}" + (f" '{name}'" if isinstance(name, str) else "")
        _check_keys(table, GRID_KEYS, label)
        if not isinstance(name, str) or not SECTION_NAME.fullmatch(name):
            raise ValueError(f"{label}: every [[grid]] needs a name (letters, digits, '_', '.', "
                             f"'-'; it names the output folder), got {name!r}")
        title, specs = sections.setdefault(name, (table.get("title"), []))
        if table.get("title", title) != title:
            raise ValueError(f"{label}: grids named '{name}' have different titles")
        try:
            specs += _expand_grid(_inherit(data, table))
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
    return [GridSection(name, title or name, tuple(specs))
            for name, (title, specs) in sections.items()]


# [stress] / [toy_lq]: (section, defaults, {list key: (registry, default names)}); the steps
# default to those of `chimera stress` / `chimera toy-lq`.
ONE_FILE_SECTIONS: dict[str, tuple[type[OneFileSection], dict[str, Any], dict[str, tuple]]] = {
    "stress": (StressSection, {"title": "Stress problems", "steps": 300},
               {"problems": (STRESS, STRESS.names()),
                "configs": (STRESS_CONFIGS, STRESS_CONFIGS.names())}),
    "toy_lq": (ToyLQSection, {"title": "Toy LQ credit quality", "steps": 8000},
               {"rules": (TOY_VARIANTS, list(DEFAULT_VARIANTS))}),
}


def _one_file_section(data: dict[str, Any], key: str, where: str) -> OneFileSection | None:
    """The ``[stress]`` or ``[toy_lq]`` section (None when absent); its seeds default to the
    top-level ones."""
    if key not in data:
        return None
    section, defaults, lists = ONE_FILE_SECTIONS[key]
    label = f"[{key}] of {where}"
    table = _table(data[key], f"[{key}]")
    _check_keys(table, ("title", "seeds", "steps", *lists), label)
    table = {**defaults, "seeds": data.get("seeds", [0]), **table}
    names = {}
    for field, (registry, default) in lists.items():
        values = table.get(field, default)
        if not isinstance(values, list) or not values or len(set(map(str, values))) != len(
                values):
            raise ValueError(f"{field} in {label} must be a non-empty list of distinct names, "
                             f"got {values!r}")
        names[field] = tuple(_registered(v, registry, f"{field} in {label}") for v in values)
    if not isinstance(table["title"], str):
        raise ValueError(f"title in {label} must be a string, got {table['title']!r}")
    return section(title=table["title"], seeds=tuple(_seeds(table)),
                   steps=_steps(table, label), **names)


def build_suite(data: dict[str, Any], where: str = "suite") -> Suite:
    """A parsed suite (TOML as a dict), validated: unknown keys, registry names and impossible
    values raise ``ValueError`` naming what is wrong, before anything runs."""
    _check_keys(data, SUITE_KEYS, where)
    suite = Suite(name=data.get("name"), grids=tuple(_grid_sections(data, where)),
                  stress=_one_file_section(data, "stress", where),
                  toy_lq=_one_file_section(data, "toy_lq", where))
    if not suite.specs and suite.stress is None and suite.toy_lq is None:
        raise ValueError(f"{where} declares no runs")
    for grid in suite.grids:  # sections write to their own folders; a run may recur across
        ids = [s.run_id for s in grid.specs]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            section = f" (section '{grid.name}')" if grid.name else ""
            raise ValueError(f"{where}{section} declares the same run twice: {twice}")
    return suite


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed TOML file at ``path``; ``ValueError`` when missing or not valid TOML."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"suite file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None


def read_suite(path: str | os.PathLike) -> Suite:
    """Read and validate the suite file at ``path`` (see :func:`build_suite`)."""
    return build_suite(read_toml(path), where=str(path))


def expand_suite(data: dict[str, Any], where: str = "suite") -> list[RunSpec]:
    """The training run specs of a parsed suite, validated (see :func:`build_suite`)."""
    return build_suite(data, where).specs


def load_suite(path: str | os.PathLike) -> list[RunSpec]:
    """The training run specs of the suite file at ``path``, validated."""
    return read_suite(path).specs


# --- running -----------------------------------------------------------------------------------

def run_suite(
    suite: Suite, out: str | os.PathLike, workers: int | None = None, progress: bool = True,
    resume: bool = True, desc: str = "runs",
) -> str:
    """Run ``suite`` into ``out`` on one pool of ``workers`` processes (the stress and toy LQ
    sections as one job each, started first) and return the summary (markdown: per section a
    ``## heading`` and its table), also written to ``out/summary.md``.

    ``resume``: skip finished training runs, continue interrupted ones from their checkpoints,
    and reuse a stress / toy LQ file holding every final record of its section; otherwise every
    record file is rewritten.
    """
    workers = resolve_workers(workers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    one_file = [s for s in (suite.stress, suite.toy_lq) if s is not None]
    done = {s.file: s.finished(out / s.file) if resume else None for s in one_file}
    calls: list[Call] = [(s.run, (str(out / s.file),)) for s in one_file if done[s.file] is None]
    for grid in suite.grids:
        (out / grid.name).mkdir(parents=True, exist_ok=True)
        calls += [spec_call(spec, out / grid.name, resume) for spec in grid.specs]
    results = iter(run_calls(calls, workers, progress, desc))
    finals = {s.file: done[s.file] or next(results) for s in one_file}
    parts: list[tuple[str | None, str]] = []
    if suite.stress is not None:
        parts.append((suite.stress.heading(), suite.stress.table(finals[suite.stress.file])))
    for grid in suite.grids:
        parts.append((grid.heading(), runs_table([next(results) for _ in grid.specs])))
    if suite.toy_lq is not None:
        parts.append((suite.toy_lq.heading(), suite.toy_lq.table(finals[suite.toy_lq.file])))
    summary = "\n\n".join(table if heading is None else f"## {heading}\n\n{table}"
                          for heading, table in parts) + "\n"
    (out / "summary.md").write_text(summary, encoding="utf-8")
    return summary


def run_sweep(
    path: str | os.PathLike, out: str | os.PathLike, workers: int | None = None,
    progress: bool = True,
) -> str:
    """Run (or finish) the suite at ``path`` into ``out``; returns the summary, which is also
    written to ``out/summary.md``."""
    return run_suite(read_suite(path), out, workers, progress, resume=True, desc=Path(path).stem)
