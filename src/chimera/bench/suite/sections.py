"""What a validated suite is: its sections, and how each runs and is tabled. Training grids run
one job per spec (:mod:`chimera.bench.suite.execute`); the stress and toy LQ sections run as one
job each into one record file."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chimera.bench.jobs.stress import DEFAULT_OPTIONS, StressOptions, run_stress, stress_config_id
from chimera.bench.jobs.toy_lq import run_toy_lq
from chimera.bench.report.tables import stress_table, toy_lq_table
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec


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
