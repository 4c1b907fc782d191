"""report.md's PNG plots, from the configurations of :mod:`chimera.bench.report.write`:
validation accuracy vs epoch (eval records carry no test metric), final test accuracy vs
effective bits, and step time vs optimizer state memory.

Each ``plot_*`` draws one figure (matplotlib's Agg canvas, no pyplot) and returns False, writing
nothing, when the records hold nothing to draw; :func:`draw_plots` draws them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chimera.bench.report.aggregate import group_by, metric_value, seed_stats

if TYPE_CHECKING:
    from chimera.bench.report.write import Configuration

FP32_BITS = 32.0

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
    """Epochs and the mean / min / max over seeds of the eval validation accuracy (in %)."""
    by_epoch = group_by((r for r in c.evals if metric_value(r.get("val_accuracy")) is not None),
                        ["epoch"])
    if not by_epoch:
        return None
    epochs = sorted(by_epoch)
    accs = [[r["val_accuracy"] * 100 for r in by_epoch[e]] for e in epochs]
    return (np.array([e for (e,) in epochs]), np.array([seed_stats(a)["mean"] for a in accs]),
            np.array([min(a) for a in accs]), np.array([max(a) for a in accs]))


def plot_learning_curves(configs: Sequence[Configuration], path: Path) -> bool:
    """Validation accuracy vs epoch per training configuration, one subplot per task/model."""
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
        ax.set(title=scope, xlabel="epoch", ylabel="validation accuracy (%)")
        ax.legend(loc="lower right")
    for ax in axes[len(scopes):]:
        ax.set_visible(False)
    fig.suptitle("Validation accuracy vs epoch (line: mean over seeds; band: min–max over "
                 "seeds)")
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
     "validation accuracy vs epoch per configuration",
     "no eval records with val_accuracy of a training run"),
    ("accuracy_vs_bits.png", plot_accuracy_vs_bits,
     "final test accuracy vs effective bits", "no final record of a training run"),
    ("step_time_vs_memory.png", plot_step_time_vs_memory,
     "median step time vs optimizer state bytes",
     "no final record with step time and optimizer state bytes"),
)


def draw_plots(configs: Sequence[Configuration], out_dir: Path,
               table: Sequence[tuple[str, Any, str, str]] = PLOTS
               ) -> tuple[list[Path], list[str]]:
    """Every plot of ``table`` (``(file, draw, what, why it may be missing)`` rows, default
    :data:`PLOTS`) into ``out_dir``: the files written and report.md's lines about them (a
    linked image, or why it was skipped)."""
    from matplotlib import rc_context

    plots, notes = [], []
    with rc_context(RC):
        for name, draw, what, missing in table:
            if draw(configs, out_dir / name):
                plots.append(out_dir / name)
                notes += [f"- `{name}`: {what}.", "", f"  ![{what}]({name})", ""]
            else:
                notes += [f"- `{name}`: skipped ({missing}).", ""]
    return plots, notes[:-1]
