"""``chimera report DIR``: per-configuration statistics, tables and plots from records alone.

Runs are grouped into configurations by ``config_id`` (the seeds of a configuration share it).
For a metric with values x_1..x_n over the configuration's finished runs:

    mean = (1/n) sum_i x_i,   std = sqrt(sum_i (x_i - mean)^2 / (n - 1)),
    95% CI = mean ± t_{0.975, n-1} * std / sqrt(n)      (Student t; no CI when n = 1).

A run with no final record is unfinished: it is left out of the statistics and flagged, as is a
configuration lacking seeds that other configurations of its table have. When a run has several
final records the last one counts. report.md depends on the records only (no time stamps, no
paths), so the same records always give a byte-identical report.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from chimera.bench.report.stats import format_table, group_by, mean_std, pm
from chimera.run.records import read_records

TRAINING_METRICS = (
    "test_accuracy",
    "test_loss",
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
              "quant_hparams", "controller", "eval_batch_size", "log_every", "device")
STAT_KEYS = ("mean", "std", "n", "ci_low", "ci_high")
IDENTITY_COLUMNS = ("task", "model", "optimizer", "quantizer", "rule", "problem", "config",
                "variant")
FP32_BITS = 32.0


@dataclass(frozen=True)
class ReportPaths:
    """The files ``write_report`` wrote."""

    markdown: Path
    csv: Path
    plots: list[Path]


def seed_stats(values: Iterable[float | None], confidence: float = 0.95) -> dict[str, Any]:
    """``mean``, sample ``std`` (ddof=1), ``n`` and the Student-t interval ``ci_low``/``ci_high``
    = mean ∓ t_{(1+confidence)/2, n-1} std / sqrt(n) of the non-None values (None when n < 2)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean, std, n = mean_std(values)
    if n < 2:
        return {"mean": mean, "std": std, "n": n, "ci_low": None, "ci_high": None}
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


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

    @property
    def label(self) -> str:
        return f"{self.scope} {self.variant}"

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.finals)

    def flags(self) -> str:
        """``⚠`` notes for missing seeds and unfinished runs ('' when complete)."""
        notes = []
        if self.missing_seeds:
            notes.append(f"⚠ missing seeds {self.missing_seeds}")
        if self.unfinished_seeds:
            k = len(self.unfinished_seeds)
            notes.append(f"⚠ {k} run{'s' * (k > 1)} unfinished (seeds {self.unfinished_seeds})")
        return "; ".join(notes)

    def row(self, metrics: Sequence[str]) -> dict[str, Any]:
        """Identity columns plus ``{metric}_{mean,std,n,ci_low,ci_high}`` over finished runs."""
        row: dict[str, Any] = {
            "kind": self.kind, "config_id": self.config_id, "label": self.label,
            **{k: self.identity.get(k) for k in IDENTITY_COLUMNS},
            "seeds": self.seeds, "n": len(self.finals), "missing_seeds": self.missing_seeds,
            "unfinished_seeds": self.unfinished_seeds, "flags": self.flags(),
        }
        for m in metrics:
            stats = seed_stats(_number(r.get(m)) for r in self.finals)
            row.update({f"{m}_{k}": stats[k] for k in STAT_KEYS})
        return row


def _number(value: Any) -> float | None:
    """A metric value, or None for absent / non-numeric values (e.g. per-layer lists)."""
    is_num = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if is_num else None


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
                   if k.startswith(CREDIT_PREFIXES) and _number(v) is not None})


# --- markdown and CSV --------------------------------------------------------------------------

def _mean(row: dict[str, Any], metric: str, fmt: str, scale: float = 1.0) -> str:
    value = row.get(f"{metric}_mean")
    return "-" if value is None else f"{value * scale:{fmt}}"


def _ci(row: dict[str, Any], metric: str, fmt: str, scale: float = 1.0) -> str:
    lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    return "-" if lo is None else f"[{lo * scale:{fmt}}, {hi * scale:{fmt}}]"


def _seeds(row: dict[str, Any]) -> str:
    return ",".join(map(str, row["seeds"])) or "-"


Column = tuple[str, Callable[[dict[str, Any]], Any]]

TRAINING_COLUMNS: list[Column] = [
    ("configuration", lambda r: r["label"]),
    ("seeds", _seeds),
    ("n", lambda r: r["n"]),
    ("test acc (%)", lambda r: pm(r, "test_accuracy", ".2f", 100)),
    ("95% CI (%)", lambda r: _ci(r, "test_accuracy", ".2f", 100)),
    ("test loss", lambda r: pm(r, "test_loss", ".4f")),
    ("95% CI", lambda r: _ci(r, "test_loss", ".4f")),
    ("eff. bits", lambda r: _mean(r, "quant_global_effective_bits", ".3f")),
    ("zero ratio", lambda r: _mean(r, "quant_global_zero_ratio", ".3f")),
    ("opt. state (B)", lambda r: _mean(r, "optimizer_state_bytes", ".0f")),
    ("step (ms)", lambda r: _mean(r, "median_step_time_s", ".3f", 1e3)),
    ("opt. step (ms)", lambda r: _mean(r, "median_optimizer_step_time_s", ".3f", 1e3)),
    ("flags", lambda r: r["flags"]),
]
TOY_LQ_COLUMNS: list[Column] = [
    ("rule variant", lambda r: r["variant"]),
    ("seeds", _seeds),
    ("n", lambda r: r["n"]),
    ("costate cosine", lambda r: pm(r, "costate_cosine", ".3f")),
    ("95% CI", lambda r: _ci(r, "costate_cosine", ".3f")),
    ("perturbation rho", lambda r: pm(r, "perturbation_rho", ".3f")),
    ("nudging", lambda r: pm(r, "nudging", ".3f")),
    ("bridge residual", lambda r: pm(r, "bridge_residual", ".3g")),
    ("time/run (s)", lambda r: _mean(r, "train_time_s", ".1f")),
    ("flags", lambda r: r["flags"]),
]
STRESS_COLUMNS: list[Column] = [
    ("problem", lambda r: r["problem"]),
    ("config", lambda r: r["config"]),
    ("seeds", _seeds),
    ("n", lambda r: r["n"]),
    ("final loss", lambda r: pm(r, "final_loss", ".4g")),
    ("95% CI", lambda r: _ci(r, "final_loss", ".4g")),
    ("step (µs)", lambda r: _mean(r, "median_step_time_s", ".0f", 1e6)),
    ("opt. state (B)", lambda r: _mean(r, "optimizer_state_bytes", ".0f")),
    ("collision", lambda r: pm(r, "collision_score", ".3f")),
    ("flags", lambda r: r["flags"]),
]


def _credit_columns(fields: Sequence[str]) -> list[Column]:
    return [("configuration", lambda r: r["label"]), ("n", lambda r: r["n"])] + [
        (f, lambda r, f=f: pm(r, f, ".4g")) for f in fields]


def render_markdown(
    configs: Sequence[Configuration], n_files: int, n_ignored: int, plot_notes: Sequence[str]
) -> str:
    """report.md: a header, the training, credit, toy LQ and stress tables, and the plot
    list."""
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
    lines += [
        "",
        "Statistics over the finished seeds of a configuration: mean ± sample std (ddof=1) and "
        "the 95% confidence interval mean ± t(0.975, n−1)·std/√n (Student t; '-' for n = 1). "
        "Unfinished runs (no final record) are left out of the statistics and flagged ⚠, as are "
        "configurations missing seeds that other configurations of their table have. "
        "Times are medians per run, averaged over seeds.",
    ]
    sections = [
        ("Training configurations", training, lambda rows: format_table(rows, TRAINING_COLUMNS),
         TRAINING_METRICS + tuple(credit)),
        ("Credit diagnostics (final records)",
         [c for c in training if any(_number(r.get(f)) is not None
                                     for r in c.finals for f in credit)],
         lambda rows: format_table(rows, _credit_columns(credit)), tuple(credit)),
        ("Toy LQ credit quality", toy_lq,
         lambda rows: format_table(rows, TOY_LQ_COLUMNS), TOY_LQ_METRICS),
        ("Stress configurations", stress, lambda rows: format_table(rows, STRESS_COLUMNS),
         STRESS_METRICS),
    ]
    for title, group, table, metrics in sections:
        if group:
            lines += ["", f"## {title}", "", table([c.row(metrics) for c in group])]
    lines += ["", "## Plots", "", *plot_notes]
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


# --- plots -------------------------------------------------------------------------------------

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
RC = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 9,
      "figure.titlesize": 14, "axes.grid": True, "grid.alpha": 0.3}


def _style(i: int, n: int) -> dict[str, Any]:
    """Colour, marker and line style of the i-th of n configurations (tab10, or tab20 past 10
    configurations; the (colour, marker, line style) triple is distinct for i < 40)."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if n <= 10 else "tab20"]
    return {"color": palette(i % palette.N), "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // palette.N) % len(LINESTYLES)]}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot: no global backend change

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _log_if_spread(ax: Any, axis: str, values: Sequence[float], ratio: float = 20.0) -> None:
    """Log scale on ``axis`` when max/min of the positive ``values`` exceeds ``ratio``."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > ratio:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        scale_axis = ax.xaxis if axis == "x" else ax.yaxis
        scale_axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        scale_axis.set_major_formatter(FormatStrFormatter("%g"))


def _eval_curve(c: Configuration) -> tuple[np.ndarray, ...] | None:
    """Epochs and the mean / min / max over seeds of the eval test accuracy (in %)."""
    by_epoch = group_by((r for r in c.evals if _number(r.get("test_accuracy")) is not None),
                        ["epoch"])
    if not by_epoch:
        return None
    epochs = sorted(by_epoch)
    accs = [np.array([r["test_accuracy"] for r in by_epoch[e]]) * 100 for e in epochs]
    return (np.array([e for (e,) in epochs]), np.array([a.mean() for a in accs]),
            np.array([a.min() for a in accs]), np.array([a.max() for a in accs]))


def plot_learning_curves(configs: Sequence[Configuration], path: Path) -> bool:
    """Test accuracy vs epoch per training configuration, one subplot per task/model."""
    training = [c for c in configs if c.kind == "training"]
    curves = [(i, c, cur) for i, c in enumerate(training) if (cur := _eval_curve(c)) is not None]
    if not curves:
        return False
    scopes = list(dict.fromkeys(c.scope for _, c, _ in curves))
    ncols = min(2, len(scopes))
    nrows = math.ceil(len(scopes) / ncols)
    fig = _figure(7.5 * ncols, 6.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, scope in zip(axes, scopes, strict=False):
        for i, c, (epochs, mean, lo, hi) in (x for x in curves if x[1].scope == scope):
            style = _style(i, len(training))
            n = len({r["seed"] for r in c.evals})
            ax.plot(epochs, mean, color=style["color"], linestyle=style["linestyle"],
                    linewidth=1.6, label=f"{c.variant} (n={n})")
            ax.fill_between(epochs, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
        ax.set(title=scope, xlabel="epoch", ylabel="test accuracy (%)")
        ax.legend(loc="lower right")
    for ax in axes[len(scopes):]:
        ax.set_visible(False)
    fig.suptitle("Test accuracy vs epoch (line: mean over seeds; band: min–max over seeds)")
    fig.savefig(path)
    return True


def plot_accuracy_vs_bits(configs: Sequence[Configuration], path: Path) -> bool:
    """Final test accuracy vs effective bits per weight; fp32 runs in a panel at 32 bits."""
    training = [c for c in configs if c.kind == "training"]
    points = []
    for i, c in enumerate(training):
        row = c.row(["test_accuracy", "quant_global_effective_bits"])
        if row["test_accuracy_mean"] is None:
            continue
        bits = row["quant_global_effective_bits_mean"]
        if bits is None and c.identity.get("quantizer") != "fp32":
            continue
        points.append((i, c, row, bits is None))
    if not points:
        return False
    panels = [fp for fp in (False, True) if any(p[3] == fp for p in points)]
    fig = _figure(11, 5.5)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False,
                        width_ratios=[3, 1] if len(panels) == 2 else None).ravel()
    for ax, fp32 in zip(axes, panels, strict=True):
        group = [p for p in points if p[3] == fp32]
        for k, (i, c, row, _) in enumerate(group):
            if fp32:
                x, xerr = FP32_BITS + 0.6 * ((k + 0.5) / len(group) - 0.5), None
            else:
                x, xerr = row["quant_global_effective_bits_mean"], row[
                    "quant_global_effective_bits_std"]
            style = _style(i, len(training))
            ax.errorbar(x, row["test_accuracy_mean"] * 100, yerr=row["test_accuracy_std"] * 100,
                        xerr=xerr, fmt=style["marker"], color=style["color"], markersize=8,
                        capsize=3, label=c.label)
        if fp32:
            ax.set(xlim=(FP32_BITS - 0.5, FP32_BITS + 0.5), xticks=[FP32_BITS],
                   xlabel="bits per weight", title="fp32")
        else:
            ax.set(xlabel="effective bits per weight (entropy of −/0/+ ratios)",
                   title="ternary")
    axes[0].set_ylabel("final test accuracy (%)")
    fig.legend(loc="outside right center")
    fig.suptitle("Final test accuracy vs effective bits (mean ± std over seeds)")
    fig.savefig(path)
    return True


def _timed(configs: Sequence[Configuration], kind: str, metric: str) -> list[tuple]:
    """(configuration, its row) of the ``kind`` configurations with ``metric`` and state bytes."""
    rows = [(c, c.row([metric, "optimizer_state_bytes"])) for c in configs if c.kind == kind]
    return [(c, r) for c, r in rows
            if None not in (r[f"{metric}_mean"], r["optimizer_state_bytes_mean"])]


def _time_vs_bytes(ax: Any, points: Sequence[tuple], metric: str, styles: Sequence[dict],
                   labels: Sequence[str | None]) -> None:
    """Mean ± std step time (ms) vs optimizer state (KiB), one marker per configuration."""
    xs = [r["optimizer_state_bytes_mean"] / 1024 for _, r in points]
    ys = [r[f"{metric}_mean"] * 1e3 for _, r in points]
    for (_, r), x, y, style, label in zip(points, xs, ys, styles, labels, strict=True):
        ax.errorbar(x, y, yerr=r[f"{metric}_std"] * 1e3, fmt=style["marker"],
                    color=style["color"], markersize=8, capsize=3, alpha=0.85, label=label)
    _log_if_spread(ax, "x", xs)
    _log_if_spread(ax, "y", ys)
    ax.set(xlabel="optimizer state (KiB)", ylabel="median step time (ms)")


def plot_step_time_vs_memory(configs: Sequence[Configuration], path: Path) -> bool:
    """Median step time vs optimizer state bytes per configuration: training runs (optimizer
    step alone, one panel) and stress runs (whole step, one panel per problem)."""
    training = _timed(configs, "training", "median_optimizer_step_time_s")
    stress = _timed(configs, "stress", "median_step_time_s")
    if not training and not stress:
        return False
    problems = list(dict.fromkeys(c.scope for c, _ in stress))
    stress_rows = math.ceil(len(problems) / 2)
    heights = [h for h, part in ((5.0, training), (4.0 * stress_rows, stress)) if part]
    fig = _figure(13, sum(heights) + 0.6)
    subfigs = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False).ravel()
    if training:
        ax = subfigs[0].subplots()
        index = {c.config_id: i for i, c in enumerate(c for c in configs if c.kind == "training")}
        styles = [_style(index[c.config_id], len(index)) for c, _ in training]
        _time_vs_bytes(ax, training, "median_optimizer_step_time_s", styles,
                       [c.label for c, _ in training])
        ax.set_title("training runs: median optimizer step")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    if stress:
        variants = list(dict.fromkeys(c.variant for c, _ in stress))
        axes = subfigs[-1].subplots(stress_rows, min(2, len(problems)), squeeze=False).ravel()
        for ax, problem in zip(axes, problems, strict=False):
            points = [(c, r) for c, r in stress if c.scope == problem]
            styles = [_style(variants.index(c.variant), len(variants)) for c, _ in points]
            labels = [c.variant if ax is axes[0] else None for c, _ in points]
            _time_vs_bytes(ax, points, "median_step_time_s", styles, labels)
            ax.set_title(f"stress {problem}: median whole step")
        for ax in axes[len(problems):]:
            ax.set_visible(False)
        subfigs[-1].legend(loc="outside right center")
    fig.suptitle("Step time vs optimizer state memory (mean ± std over seeds)")
    fig.savefig(path)
    return True


PLOTS = (
    ("learning_curves.png", plot_learning_curves,
     "test accuracy vs epoch per configuration", "no eval records of a training run"),
    ("accuracy_vs_bits.png", plot_accuracy_vs_bits,
     "final test accuracy vs effective bits", "no final record of a training run"),
    ("step_time_vs_memory.png", plot_step_time_vs_memory,
     "median step time vs optimizer state bytes",
     "no final record with step time and optimizer state bytes"),
)


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


def write_report(directory: str | os.PathLike, out: str | os.PathLike | None = None
                 ) -> ReportPaths:
    """Write report.md, report.csv and the PNG plots for the records under ``directory``
    into ``out`` (default: ``directory``)."""
    files = record_files(directory)
    records = read_records(files)
    configs = collect_configurations(records)
    out_dir = Path(directory if out is None else out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from matplotlib import rc_context

    plots, notes = [], []
    with rc_context(RC):
        for name, draw, what, missing in PLOTS:
            if draw(configs, out_dir / name):
                plots.append(out_dir / name)
                notes += [f"- `{name}`: {what}.", "", f"  ![{what}]({name})", ""]
            else:
                notes += [f"- `{name}`: skipped ({missing}).", ""]
    n_ignored = sum("config_id" not in r for r in records)
    markdown = out_dir / "report.md"
    markdown.write_text(render_markdown(configs, len(files), n_ignored, notes[:-1]),
                        encoding="utf-8")
    csv_path = out_dir / "report.csv"
    write_csv(configs, csv_path)
    return ReportPaths(markdown, csv_path, plots)
