"""What a validated suite is: its sections, and how each runs and is tabled. Training grids run
one job per spec (:mod:`chimera.bench.suite.execute`); the stress and toy LQ sections run as one
job each into one record file. ``[tune]`` is the search space of ``chimera tune``
(:mod:`chimera.bench.jobs.tune`)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chimera.bench.jobs.stress import DEFAULT_OPTIONS, StressOptions, run_stress, stress_config_id
from chimera.bench.jobs.toy_lq import run_toy_lq
from chimera.bench.report.tables import stress_table, toy_lq_table
from chimera.bench.workers import Resources
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec


@dataclass(frozen=True)
class GridSection:
    """Training runs written to ``<out>/<name>/`` (``name`` '' for a one-grid suite: ``<out>``)."""

    name: str
    title: str | None
    specs: tuple[RunSpec, ...]
    record_fields: Mapping[str, Any] = field(default_factory=dict)  # added to every record

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
    options: StressOptions = DEFAULT_OPTIONS

    file = "stress.jsonl"

    def _run(self, writer: RecordWriter) -> list[dict[str, Any]]:
        return run_stress(self.problems, self.configs, seeds=self.seeds, steps=self.steps,
                          writer=writer, progress=False, options=self.options)

    def _key(self, final: dict[str, Any]) -> tuple:
        return final.get("config_id"), final.get("seed"), final.get("steps")

    def _expected(self) -> list[tuple]:
        return [(stress_config_id(p, c, self.options), s, self.steps)
                for p, c, s in itertools.product(self.problems, self.configs, self.seeds)]

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


TUNE_SAMPLERS = ("grid", "random", "tpe")
TUNE_METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}  # metric -> direction
TUNE_DIGITS = 12  # significant digits of the values of a range


def seed_mean(values: Sequence[float | None]) -> float | None:
    """A candidate's score: ``(1/|S|) sum_s metric(s)`` over its tuning seeds (None when some
    seed gave no finite value); ``fmean`` is exactly rounded, so the order of the seeds does not
    matter."""
    return None if not values or None in values else statistics.fmean(values)


def candidate_key(values: Sequence[Any]) -> tuple:
    """A total order of candidates (their values in address order): numbers ascending, then
    other values by their JSON text."""
    return tuple((0, float(v), "") if isinstance(v, int | float) and not isinstance(v, bool)
                 else (1, 0.0, json.dumps(v, sort_keys=True)) for v in values)


def best_candidate(candidates: Sequence[Sequence[Any]], scores: Sequence[float | None],
                   maximize: bool) -> int | None:
    """The index of the best score (max or min) among the candidates that have one (None when
    none has); ties go to the first in :func:`candidate_key` order, so the choice does not
    depend on the order the candidates were tried in."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    if not scored:
        return None
    sign = -1.0 if maximize else 1.0
    return min(scored, key=lambda i: (sign * scores[i], candidate_key(candidates[i])))


@dataclass(frozen=True)
class ParamRange:
    """``low`` to ``high``, evenly spaced on a log scale with ``log``; ``num`` values, or the
    continuous range (None: random and tpe samplers only)."""

    low: float
    high: float
    log: bool
    num: int | None = None

    def values(self) -> tuple[float, ...]:
        """The ``num`` values: ``low * (high/low)^(i/(num-1))`` (log) or ``low + (high-low) *
        i/(num-1)``, rounded to ``TUNE_DIGITS`` significant digits (so 1e-3 is 0.001)."""
        ends = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        steps = [ends[0] + (ends[1] - ends[0]) * i / (self.num - 1) for i in range(self.num)]
        return tuple(float(f"{math.exp(v) if self.log else v:.{TUNE_DIGITS}g}") for v in steps)


@dataclass(frozen=True)
class TuneSection:
    """``[tune]``: per address (``TABLE.KEY`` of a run spec's hyper-parameter tables) its
    candidates or range, the sampler and its budget, the tuning seeds and the metric."""

    params: Mapping[str, tuple[Any, ...] | ParamRange]
    sampler: str = "grid"
    trials: int | None = None
    seeds: tuple[int, ...] = (1000,)
    metric: str = "val_accuracy"
    sampler_seed: int = 0

    @property
    def maximize(self) -> bool:
        return TUNE_METRICS[self.metric] == "maximize"

    def choices(self, address: str) -> tuple[Any, ...] | None:
        """The discrete candidates of ``address`` (None for a continuous range)."""
        values = self.params[address]
        if isinstance(values, ParamRange):
            return None if values.num is None else values.values()
        return values

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the candidates (the grid sampler's trials), in order."""
        names = list(self.params)
        return [dict(zip(names, combo, strict=True))
                for combo in itertools.product(*(self.choices(n) for n in names))]

    def apply(self, spec: RunSpec, values: Mapping[str, Any], seed: int | None = None
              ) -> RunSpec:
        """``spec`` with ``values`` (address -> value) set, on ``seed`` (default: its own)."""
        tables: dict[str, dict[str, Any]] = {}
        for address, value in values.items():
            table, key = address.split(".")
            tables.setdefault(table, dict(getattr(spec, table)))[key] = value
        return dataclasses.replace(spec, **tables, seed=spec.seed if seed is None else seed)


@dataclass(frozen=True)
class Suite:
    """A validated suite: its grid sections, optional stress and toy LQ sections, and the
    search space of ``chimera tune``."""

    name: str | None
    grids: tuple[GridSection, ...]
    stress: StressSection | None = None
    toy_lq: ToyLQSection | None = None
    tune: TuneSection | None = None
    resources: Resources | None = None  # per run, on an executor that places runs

    @property
    def specs(self) -> list[RunSpec]:
        """Every training run of the suite, in order."""
        return [s for g in self.grids for s in g.specs]
