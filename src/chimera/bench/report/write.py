"""``chimera report DIR``: per-configuration statistics, tables and plots from records alone.

Runs are grouped into configurations by ``config_id`` (the seeds of a configuration share it);
a metric's statistics over the configuration's finished runs (mean, sample std, n, 95% Student-t
interval) are those of :mod:`chimera.bench.report.aggregate`, its tables those of
:mod:`chimera.bench.report.tables`, its plots those of :mod:`chimera.bench.report.plots` and
:mod:`chimera.bench.report.rules_plots`; the
time to target and the performance profiles those of :mod:`chimera.bench.report.profiles`.

A run with no final record is unfinished: it is left out of the statistics and flagged, as is a
configuration lacking seeds that other configurations of its table have. When a run has several
final records the last one counts. A malformed record line is skipped (``read_records``) and
flagged: in the header (file and line, relative to the records folder) and on the configuration
whose run file it sits in (when the file's records share one ``config_id``). A metric value of the
wrong type (a string, a list, a boolean where a number belongs) is left out of the statistics and
flagged on its configuration with the run it comes from. report.md depends on the records only
(no time stamps, no absolute paths), so the same records always give a byte-identical report.md.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

from chimera.bench.report.aggregate import group_by, metric_stats, metric_value
from chimera.bench.report.plots import draw_plots
from chimera.bench.report.profiles import time_to_target_report
from chimera.bench.report.rules_plots import RULE_PLOTS
from chimera.bench.report.sensitivity import sensitivity_report, split_tuning
from chimera.bench.report.tables import (
    credit_report_table,
    stress_report_table,
    toy_lq_report_table,
    training_report_table,
)
from chimera.bench.report.targets import resolve_targets
from chimera.run.records import SkippedLine, read_records

TRAINING_METRICS = (
    "test_accuracy",
    "test_loss",
    "val_accuracy",
    "val_loss",
    "quant_global_effective_bits",
    "quant_global_zero_ratio",
    "optimizer_state_bytes",
    "median_step_time_s",
    "median_optimizer_step_time_s",
)
STRESS_METRICS = ("final_loss", "median_step_time_s", "optimizer_state_bytes", "collision_score")
TOY_LQ_METRICS = ("costate_cosine", "perturbation_rho", "nudging", "bridge_residual",
                  "train_time_s")
KINDS = ("training", "toy_lq", "stress")  # configuration kinds, in report order
CREDIT_PREFIXES = ("credit_", "costate_")
# Spec fields that tell apart configurations whose task/model/optimizer/quantizer/rule coincide.
LABEL_KEYS = ("epochs", "batch_size", "lr_schedule", "optimizer_hparams", "model_hparams",
              "quant_hparams", "controller", "eval_batch_size", "log_every", "device",
              "max_batches", "eval_max_batches", "rule_hparams")
IDENTITY_COLUMNS = ("task", "model", "optimizer", "quantizer", "rule", "problem", "config",
                    "variant")


@dataclass(frozen=True)
class ReportPaths:
    """The files ``write_report`` wrote."""

    markdown: Path
    csv: Path
    plots: list[Path]


@dataclass
class Configuration:
    """The runs sharing one ``config_id``: finished runs' final records and unfinished seeds."""

    config_id: str
    kind: str  # one of KINDS
    identity: dict[str, Any]
    finals: list[dict[str, Any]]
    unfinished_seeds: list[int]
    evals: list[dict[str, Any]]
    scope: str = ""  # task/model, the stress problem, or "toy_lq"
    variant: str = ""  # optimizer quantizer rule, the stress config, or the toy LQ variant
    missing_seeds: list[int] = field(default_factory=list)
    corrupt_lines: list[str] = field(default_factory=list)  # "file:line" of skipped lines

    @property
    def label(self) -> str:
        return f"{self.scope} {self.variant}"

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.finals)

    def non_numeric(self, metrics: Sequence[str]) -> dict[str, list[str]]:
        """Per metric, the run ids whose final record holds it with a non-numeric value (null,
        the writer's non-finite float, counts as absent)."""
        bad = {m: [str(r.get("run_id")) for r in self.finals
                   if r.get(m) is not None and metric_value(r[m]) is None] for m in metrics}
        return {m: runs for m, runs in bad.items() if runs}

    def flags(self, metrics: Sequence[str] = ()) -> str:
        """``⚠`` notes for missing seeds, unfinished runs, skipped corrupt lines and values of
        ``metrics`` that are not numbers ('' when all is well)."""
        notes = []
        if self.missing_seeds:
            notes.append(f"⚠ missing seeds {self.missing_seeds}")
        if self.unfinished_seeds:
            k = len(self.unfinished_seeds)
            notes.append(f"⚠ {k} run{'s' * (k > 1)} unfinished (seeds {self.unfinished_seeds})")
        if self.corrupt_lines:
            notes.append(corrupt_note(self.corrupt_lines))
        for metric, runs in self.non_numeric(metrics).items():
            notes.append(f"⚠ non-numeric {metric} in run{'s' * (len(runs) > 1)} "
                         f"{', '.join(runs)}")
        return "; ".join(notes)

    def row(self, metrics: Sequence[str]) -> dict[str, Any]:
        """Identity columns plus ``{metric}_{mean,std,n,ci_low,ci_high}`` over finished runs."""
        row: dict[str, Any] = {
            "kind": self.kind, "config_id": self.config_id, "label": self.label,
            **{k: self.identity.get(k) for k in IDENTITY_COLUMNS},
            "seeds": self.seeds, "n": len(self.finals), "missing_seeds": self.missing_seeds,
            "unfinished_seeds": self.unfinished_seeds, "flags": self.flags(metrics),
        }
        return {**row, **metric_stats(self.finals, metrics)}


def corrupt_note(locations: Sequence[str], shown: int = 10) -> str:
    """``⚠ N corrupt record line(s) skipped (file:line, ...)``, listing at most ``shown``."""
    k = len(locations)
    listed = ", ".join(locations[:shown]) + (f", and {k - shown} more" if k > shown else "")
    return f"⚠ {k} corrupt record line{'s' * (k > 1)} skipped ({listed})"


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _assign_labels(configs: Sequence[Configuration]) -> None:
    """Readable labels; configurations that would share one get the spec fields that differ
    (or, failing that, their config_id) appended."""
    for c in configs:
        ident = c.identity
        if c.kind == "stress":
            c.scope, c.variant = str(ident.get("problem")), str(ident.get("config"))
        elif c.kind == "toy_lq":
            c.scope, c.variant = "toy_lq", str(ident.get("variant"))
        else:
            c.scope = f"{ident.get('task')}/{ident.get('model')}"
            c.variant = " ".join(str(ident.get(k)) for k in ("optimizer", "quantizer", "rule"))
    clashes: dict[str, list[Configuration]] = {}
    for c in configs:
        clashes.setdefault(c.label, []).append(c)
    for group in (g for g in clashes.values() if len(g) > 1):
        keys = [k for k in LABEL_KEYS if len({_compact(c.identity.get(k)) for c in group}) > 1]
        extras = [[f"{k}={_compact(c.identity.get(k))}" for k in keys] for c in group]
        if len({tuple(e) for e in extras}) < len(group):
            extras = [e + [f"#{c.config_id}"] for e, c in zip(extras, group, strict=True)]
        for c, extra in zip(group, extras, strict=True):
            c.variant = " ".join([c.variant, *extra])


def collect_configurations(records: Iterable[dict[str, Any]]) -> list[Configuration]:
    """Configurations of the records carrying a ``config_id`` (training first, then toy LQ,
    then stress, each in first-seen order); a configuration misses the seeds that others of its
    kind have and it has not."""
    configs = []
    for (config_id,), recs in group_by((r for r in records if "config_id" in r),
                                       ["config_id"]).items():
        finals, unfinished = [], []
        for run in group_by(recs, ["run_id"]).values():
            run_finals = [r for r in run if r.get("record_type") == "final"]
            if run_finals:
                finals.append(run_finals[-1])
            else:
                unfinished.append(run[0].get("seed"))
        task = str(recs[0].get("task", ""))
        kind = "stress" if task.startswith("stress/") else "toy_lq" if task == "toy_lq" else \
            "training"
        evals = [r for r in recs if r.get("record_type") == "eval"]
        finals.sort(key=itemgetter("seed"))
        configs.append(Configuration(config_id, kind, recs[0], finals, sorted(unfinished), evals))
    configs.sort(key=lambda c: KINDS.index(c.kind))
    _assign_labels(configs)
    for kind in KINDS:
        group = [c for c in configs if c.kind == kind]
        expected = {s for c in group for s in c.seeds + c.unfinished_seeds}
        for c in group:
            c.missing_seeds = sorted(expected - set(c.seeds) - set(c.unfinished_seeds))
    return configs


def _credit_fields(configs: Sequence[Configuration]) -> list[str]:
    return sorted({k for c in configs for r in c.finals for k, v in r.items()
                   if k.startswith(CREDIT_PREFIXES) and metric_value(v) is not None})


# --- markdown and CSV --------------------------------------------------------------------------

def render_markdown(
    configs: Sequence[Configuration], n_files: int, n_ignored: int, plot_notes: Sequence[str],
    corrupt_lines: Sequence[str] = (), time_to_target: Sequence[str] = (),
) -> str:
    """report.md: a header (with a note on skipped ``corrupt_lines``, "file:line"), the
    training, credit, toy LQ and stress tables, the ``time_to_target`` section's lines, and the
    plot list."""
    training = [c for c in configs if c.kind == "training"]
    toy_lq = [c for c in configs if c.kind == "toy_lq"]
    stress = [c for c in configs if c.kind == "stress"]
    credit = _credit_fields(training)
    runs = sum(len(c.finals) + len(c.unfinished_seeds) for c in configs)
    unfinished = sum(len(c.unfinished_seeds) for c in configs)
    lines = [
        "# Chimera report",
        "",
        f"Computed from records alone: {n_files} record files, {runs} runs "
        f"({runs - unfinished} finished, {unfinished} unfinished), {len(configs)} configurations "
        f"({len(training)} training, {len(stress)} stress"
        + (f", {len(toy_lq)} toy LQ)." if toy_lq else ")."),
    ]
    if n_ignored:
        lines.append(f"{n_ignored} records without a `config_id` were ignored.")
    if corrupt_lines:
        lines.append(corrupt_note(corrupt_lines) + ".")
    lines += [
        "",
        "Statistics over the finished seeds of a configuration: mean ± sample std (ddof=1) and "
        "the 95% confidence interval mean ± t(0.975, n−1)·std/√n (Student t; '-' for n = 1). "
        "Unfinished runs (no final record) are left out of the statistics and flagged ⚠, as are "
        "configurations missing seeds that other configurations of their table have. "
        "Times are medians per run, averaged over seeds.",
    ]
    sections = [
        ("Training configurations", training, training_report_table,
         TRAINING_METRICS + tuple(credit)),
        ("Credit diagnostics (final records)",
         [c for c in training if any(metric_value(r.get(f)) is not None
                                     for r in c.finals for f in credit)],
         lambda rows: credit_report_table(rows, credit), tuple(credit)),
        ("Toy LQ credit quality", toy_lq, toy_lq_report_table, TOY_LQ_METRICS),
        ("Stress configurations", stress, stress_report_table, STRESS_METRICS),
    ]
    for title, group, table, metrics in sections:
        if group:
            lines += ["", f"## {title}", "", table([c.row(metrics) for c in group])]
    lines += [*time_to_target, "", "## Plots", "", *plot_notes]
    return "\n".join(lines) + "\n"


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return " ".join(map(str, value)) if isinstance(value, list) else value


def write_csv(configs: Sequence[Configuration], path: Path) -> None:
    """One row per configuration: identity columns and ``{metric}_{mean,std,n,ci_low,ci_high}``
    for every training, stress, toy LQ and credit metric (empty where it does not apply)."""
    metrics = list(dict.fromkeys(TRAINING_METRICS + STRESS_METRICS + TOY_LQ_METRICS
                                 + tuple(_credit_fields(configs))))
    rows = [c.row(metrics) for c in configs]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        if rows:
            writer.writerow(rows[0])
            writer.writerows([_csv_cell(v) for v in row.values()] for row in rows)


# --- entry point -------------------------------------------------------------------------------

def record_files(directory: str | os.PathLike) -> list[Path]:
    """Every ``*.jsonl`` under ``directory`` (recursively), sorted; ValueError when none."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"directory must be an existing directory of records, got {root}")
    files = sorted(root.rglob("*.jsonl"))
    if not files:
        raise ValueError(f"directory {root} holds no record files (*.jsonl)")
    return files


def read_report_records(files: Sequence[Path], root: Path
                        ) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
    """The records of ``files`` (all under ``root``) and their skipped corrupt lines as
    (config_id, "file:line"), the file relative to ``root``; config_id is that of the file's
    records when they share one, else None."""
    records: list[dict[str, Any]] = []
    corrupt: list[tuple[Any, str]] = []
    for path in files:
        skipped: list[SkippedLine] = []
        recs = read_records(path, skipped=skipped)
        ids = {r["config_id"] for r in recs if "config_id" in r}
        owner = next(iter(ids)) if len(ids) == 1 else None
        name = path.relative_to(root).as_posix()
        corrupt += [(owner, f"{name}:{s.lineno}") for s in skipped]
        records += recs
    return records, corrupt


def write_report(directory: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 targets: Mapping[str, float] | None = None) -> ReportPaths:
    """Write report.md, report.csv and the PNG plots for the records under ``directory``
    into ``out`` (default: ``directory``); time-to-target ``targets`` override the defaults and
    ``directory``'s targets file (:mod:`chimera.bench.report.targets`)."""
    files = record_files(directory)
    targets = resolve_targets(directory, targets)
    records, corrupt = read_report_records(files, Path(directory))
    records, tuning = split_tuning(records)  # chimera tune's search: its own section
    configs = collect_configurations(records)
    for c in configs:
        c.corrupt_lines = [loc for owner, loc in corrupt if owner == c.config_id]
    out_dir = Path(directory if out is None else out)
    out_dir.mkdir(parents=True, exist_ok=True)

    plots, notes = draw_plots(configs, out_dir)
    rule_plots, rule_notes = draw_plots(configs, out_dir, RULE_PLOTS)
    plots, notes = plots + rule_plots, [*notes, "", *rule_notes]
    ttt_lines, ttt_plots, ttt_notes = time_to_target_report(configs, targets, out_dir)
    plots, notes = plots + ttt_plots, [*notes, "", *ttt_notes]
    tune_lines, tune_plots, tune_notes = sensitivity_report(tuning, out_dir)
    plots, notes = plots + tune_plots, [*notes, *([""] if tune_notes else []), *tune_notes]
    n_ignored = sum("config_id" not in r for r in records)
    markdown = out_dir / "report.md"
    markdown.write_text(render_markdown(configs, len(files), n_ignored, notes,
                                        [loc for _, loc in corrupt], [*ttt_lines, *tune_lines]),
                        encoding="utf-8")
    csv_path = out_dir / "report.csv"
    write_csv(configs, csv_path)
    return ReportPaths(markdown, csv_path, plots)
