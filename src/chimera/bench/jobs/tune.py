"""``chimera tune SUITE --out DIR``: search the suite's ``[tune]`` hyper-parameters on tuning
seeds, then run the chosen values on the reporting seeds (in the manner of DeepOBS;
docs/suites.md#tuning-chimera-tune).

For every configuration c of the suite's grids (a run spec without its seed) and every candidate
v the search tries (every combination of a grid, or ``trials`` candidates drawn by Optuna's
random or TPE sampler, one per configuration and round), the runs of c(v) on the tuning seeds S
give the score

    score(c, v) = (1/|S|) sum_{s in S} metric(c(v), s)

(the metric of each run's final record, ``val_accuracy`` or ``val_loss``; a run without a finite
value fails its candidate), and c's chosen value is the best score (max for accuracy, min for
loss; ties: the smallest candidate, numbers ascending, whatever order they were tried in;
:func:`~chimera.bench.suite.sections.best_candidate`). ``DIR/tuned.toml`` is the suite with the
chosen values, one ``[[grid]]`` per configuration on its reporting seeds. The search runs into
``DIR/tune/``, the tuned suite into ``DIR/final/`` (records carry ``phase``: ``"tune"`` /
``"final"``), both through :func:`chimera.bench.suite.execute.run_suite` (its worker pool,
resume and folder lock), and ``DIR/report.md`` holds the final tables and the validation metric
against every candidate. Rerunning the command after a kill skips finished runs, continues
interrupted ones and writes the same tuned.toml.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chimera.bench.lock import folder_lock
from chimera.bench.report.aggregate import metric_value
from chimera.bench.report.write import write_report
from chimera.bench.suite.execute import run_suite
from chimera.bench.suite.expand import BUDGET_KEYS
from chimera.bench.suite.schema import load_suite
from chimera.bench.suite.sections import (
    GridSection,
    Suite,
    TuneSection,
    best_candidate,
    seed_mean,
)
from chimera.bench.workers import resolve_workers
from chimera.run.records import read_records
from chimera.run.spec import RunSpec

TUNE_DIR, FINAL_DIR, TUNED_FILE = "tune", "final", "tuned.toml"
ONE_GRID_NAME = "tuned"  # the [[grid]] name of a one-grid suite's configurations in tuned.toml
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Tuned:
    """One configuration's search: its section, its spec (first reporting seed), its reporting
    seeds, and every candidate tried with its score (None: failed)."""

    section: GridSection
    spec: RunSpec
    seeds: tuple[int, ...]
    tried: list[tuple[dict[str, Any], float | None]] = field(default_factory=list)

    def best(self, space: TuneSection) -> tuple[dict[str, Any], float]:
        """The chosen candidate and its score (:func:`best_candidate`)."""
        i = best_candidate([tuple(v.values()) for v, _ in self.tried],
                           [s for _, s in self.tried], space.maximize)
        if i is None:
            raise ValueError(f"[tune]: no candidate of {self.spec.config_id} gave a finite "
                             f"{space.metric} on every tuning seed")
        return self.tried[i]


# --- proposing candidates ----------------------------------------------------------------------

class _GridProposer:
    """Every combination of the candidates, in one round."""

    def __init__(self, space: TuneSection) -> None:
        self.candidates = space.grid()

    def ask(self) -> list[dict[str, Any]]:
        return self.candidates

    def tell(self, scores: Sequence[float | None]) -> None:
        pass


class _OptunaProposer:
    """One candidate per round from an Optuna study (random or TPE sampler, seeded)."""

    def __init__(self, space: TuneSection) -> None:
        import optuna
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        samplers = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler}
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line
        try:
            self.study = optuna.create_study(
                direction="maximize" if space.maximize else "minimize",
                sampler=samplers[space.sampler](seed=space.sampler_seed))
        finally:
            optuna.logging.set_verbosity(verbosity)
        self.distributions = {}
        for address, values in space.params.items():
            choices = space.choices(address)
            self.distributions[address] = CategoricalDistribution(choices) if choices else \
                FloatDistribution(values.low, values.high, log=values.log)
        self.trial = None

    def ask(self) -> list[dict[str, Any]]:
        self.trial = self.study.ask(self.distributions)
        return [{a: self.trial.params[a] for a in self.distributions}]

    def tell(self, scores: Sequence[float | None]) -> None:
        from optuna.trial import TrialState

        if scores[0] is None:
            self.study.tell(self.trial, state=TrialState.FAIL)
        else:
            self.study.tell(self.trial, scores[0])


# --- the search --------------------------------------------------------------------------------

def configurations(suite: Suite) -> list[Tuned]:
    """Every configuration of the suite's grids (per section, first-seen order)."""
    out = []
    for section in suite.grids:
        seeds: dict[str, list[int]] = {}
        first: dict[str, RunSpec] = {}
        for spec in section.specs:
            first.setdefault(spec.config_id, spec)
            seeds.setdefault(spec.config_id, []).append(spec.seed)
        out += [Tuned(section, spec, tuple(seeds[cid])) for cid, spec in first.items()]
    return out


def _score(path: Path, run_id: str, metric: str) -> float | None:
    """The ``metric`` of the run's final record (None when it is null or not a number)."""
    final = read_records(path / f"{run_id}.jsonl", record_type="final")[-1]
    if metric not in final:
        raise ValueError(f"[tune]: the final record of run {run_id} has no {metric!r}")
    return metric_value(final[metric])


def search(suite: Suite, folder: Path, workers: int, progress: bool) -> list[Tuned]:
    """Run the ``[tune]`` search of ``suite`` into ``folder`` (resuming) and return every
    configuration with its tried candidates."""
    space = suite.tune
    tuned = configurations(suite)
    proposers = [(_GridProposer if space.sampler == "grid" else _OptunaProposer)(space)
                 for _ in tuned]
    specs: dict[str, dict[str, RunSpec]] = {g.name: {} for g in suite.grids}
    fields = {"phase": "tune", "tune_params": list(space.params), "tune_metric": space.metric}
    rounds = 1 if space.sampler == "grid" else space.trials
    for round_ in range(rounds):
        asked = [p.ask() for p in proposers]
        for config, candidates in zip(tuned, asked, strict=True):
            for values in candidates:
                for seed in space.seeds:
                    spec = space.apply(config.spec, values, seed)
                    specs[config.section.name][spec.run_id] = spec
        phase = dataclasses.replace(suite, stress=None, toy_lq=None, tune=None, grids=tuple(
            dataclasses.replace(g, specs=tuple(specs[g.name].values()), record_fields=fields)
            for g in suite.grids))
        desc = "tune" if rounds == 1 else f"tune {round_ + 1}/{rounds}"
        run_suite(phase, folder, workers, progress, resume=True, desc=desc)
        for config, proposer, candidates in zip(tuned, proposers, asked, strict=True):
            path = folder / config.section.name
            scores = [seed_mean([_score(path, space.apply(config.spec, v, s).run_id, space.metric)
                             for s in space.seeds]) for v in candidates]
            proposer.tell(scores)
            config.tried += zip(candidates, scores, strict=True)
    return tuned


# --- tuned.toml --------------------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    """``value`` (plain data) as a TOML value; tables inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise ValueError(f"tuned.toml cannot hold {value!r} (TOML has no null)")


def _toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else json.dumps(key)


def _table(header: str, keys: Mapping[str, Any]) -> list[str]:
    """A TOML table: ``header`` and one line per key whose value is not None."""
    return [header, *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in keys.items()
                      if v is not None)]


def _grid_keys(config: Tuned, spec: RunSpec) -> dict[str, Any]:
    """The keys of a ``[[grid]]`` running ``spec`` on the configuration's reporting seeds."""
    return {
        "name": config.section.name or ONE_GRID_NAME, "title": config.section.title,
        "task": spec.task, "model": spec.model, "model_hparams": spec.model_hparams or None,
        "optimizer": spec.optimizer, "optimizer_hparams": spec.optimizer_hparams,
        "quantizer": spec.quantizer, "quant_hparams": spec.quant_hparams or None,
        "controller": spec.controller, "rule": spec.rule,
        "rule_hparams": spec.rule_hparams or None, "seeds": list(config.seeds),
        **{k: getattr(spec, k) for k in BUDGET_KEYS},
    }


def _values_text(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{a} = {_toml_value(v)}" for a, v in values.items())


def tuned_toml(suite: Suite, tuned: Sequence[Tuned], command: str) -> str:
    """The tuned suite: a comment naming ``command``, the suite's name, its ``[stress]``,
    ``[toy_lq]`` and ``[resources]`` tables, and per configuration a ``[[grid]]`` with the
    chosen values (commented with their score) on its reporting seeds."""
    space = suite.tune
    lines = [f"# Written by `{command}`:",
             "# the suite with the values its [tune] table chose (sampler "
             f"{space.sampler}, best mean {space.metric}",
             f"# over the tuning seeds {list(space.seeds)}), one [[grid]] per configuration on "
             "its reporting seeds."]
    if suite.name is not None:
        lines.append(f"name = {_toml_value(suite.name)}")
    if suite.stress is not None:
        s = suite.stress
        lines += ["", *_table("[stress]", {
            "title": s.title, "seeds": list(s.seeds), "steps": s.steps,
            "problems": list(s.problems), "configs": list(s.configs),
            **dataclasses.asdict(s.options)})]
    if suite.toy_lq is not None:
        t = suite.toy_lq
        lines += ["", *_table("[toy_lq]", {"title": t.title, "seeds": list(t.seeds),
                                            "steps": t.steps, "rules": list(t.rules)})]
    if suite.resources is not None:
        lines += ["", *_table("[resources]", dataclasses.asdict(suite.resources))]
    for config in tuned:
        values, score = config.best(space)
        lines += ["", f"# tuned: {_values_text(values)} ({space.metric} {score:.6g})",
                  *_table("[[grid]]", _grid_keys(config, space.apply(config.spec, values)))]
    return "\n".join(lines) + "\n"


def choices_table(suite: Suite, tuned: Sequence[Tuned]) -> str:
    """The chosen values per configuration (markdown)."""
    space = suite.tune
    rows = ["| section | configuration | chosen | " + space.metric + " | candidates tried |",
            "|---|---|---|---|---|"]
    for config in tuned:
        values, score = config.best(space)
        s = config.spec
        rows.append(f"| {config.section.name or '-'} | {s.task}/{s.model} {s.optimizer} "
                    f"{s.quantizer} {s.rule} | {_values_text(values)} | {score:.4f} | "
                    f"{len(config.tried)} |")
    return "\n".join(rows)


# --- the job -----------------------------------------------------------------------------------

def run_tune(
    path: str | os.PathLike, out: str | os.PathLike, workers: int | None = None,
    progress: bool = True, *, wait: bool = False, command: str | None = None,
) -> str:
    """``chimera tune``: the search of the suite file at ``path`` into ``<out>/tune/``, the
    tuned suite ``<out>/tuned.toml`` (its first comment names ``command``, default
    ``chimera tune PATH --out OUT``), its runs on the reporting seeds into ``<out>/final/`` and
    the report ``<out>/report.md``; returns the chosen values and the final summary (markdown),
    also written to ``<out>/summary.md``. Everything resumes; ``out`` is locked while it runs
    (``wait``: wait for another writer instead of refusing)."""
    suite = load_suite(path)
    if suite.tune is None:
        raise ValueError(f"{path} has no [tune] table (docs/suites.md#tuning-chimera-tune)")
    workers = resolve_workers(workers)
    with folder_lock(out, wait) as folder:
        tuned = search(suite, folder / TUNE_DIR, workers, progress)
        text = tuned_toml(suite, tuned, command or f"chimera tune {path} --out {out}")
        (folder / TUNED_FILE).write_text(text, encoding="utf-8")
        final = load_suite(folder / TUNED_FILE)
        final = dataclasses.replace(final, grids=tuple(
            dataclasses.replace(g, record_fields={"phase": "final"}) for g in final.grids))
        summary = run_suite(final, folder / FINAL_DIR, workers, progress, resume=True,
                            desc="final")
        result = f"## Tuning\n\n{choices_table(suite, tuned)}\n\n{summary}"
        (folder / "summary.md").write_text(result, encoding="utf-8")
        write_report(folder)
    return result
