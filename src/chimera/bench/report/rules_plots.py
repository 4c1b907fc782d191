"""report.md's learning-rule plots, from the configurations of :mod:`chimera.bench.report.write`:
the credit's costate cosine over training (per layer when the eval records carry
``credit_costate_cosine_per_layer``, else the mean ``credit_costate_cosine``) and the final test
accuracy per rule.

Like :mod:`chimera.bench.report.plots`, each ``plot_*`` draws one figure and returns False,
writing nothing, when the records hold nothing to draw; ``draw_plots(configs, out_dir,
RULE_PLOTS)`` draws them all.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chimera.bench.report.aggregate import group_by, metric_value, seed_stats
from chimera.bench.report.plots import _figure, _style

if TYPE_CHECKING:
    from chimera.bench.report.write import Configuration

PER_LAYER = "credit_costate_cosine_per_layer"
MEAN = "credit_costate_cosine"


def _per_layer(value: Any) -> list[float] | None:
    """A per-layer list of numbers, or None."""
    if not isinstance(value, list | tuple) or not value:
        return None
    values = [metric_value(v) for v in value]
    return None if None in values else values


def cosine_curves(c: Configuration) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """Epochs and, per curve name (``h_l`` per layer, or ``mean``), the mean over seeds of the
    eval records' costate cosine; per-layer curves when every such record has them."""
    evals = [r for r in c.evals if _per_layer(r.get(PER_LAYER)) is not None
             or metric_value(r.get(MEAN)) is not None]
    if not evals:
        return None
    by_epoch = group_by(evals, ["epoch"])
    epochs = sorted(by_epoch)
    layered = all(_per_layer(r.get(PER_LAYER)) is not None for r in evals) and len(
        {len(r[PER_LAYER]) for r in evals}) == 1
    if layered:
        table = np.array([np.mean([_per_layer(r[PER_LAYER]) for r in by_epoch[e]], axis=0)
                          for e in epochs])
        curves = {f"h_{l}": table[:, l] for l in range(table.shape[1])}
    else:
        curves = {"mean": np.array([seed_stats(r.get(MEAN) for r in by_epoch[e])["mean"]
                                    for e in epochs], dtype=float)}
    return np.array([e for (e,) in epochs], dtype=float), curves


def plot_credit_cosine(configs: Sequence[Configuration], path: Path) -> bool:
    """Costate cosine vs epoch, one subplot per training configuration with credit
    diagnostics (one line per layer, or the mean)."""
    found = [(c, cur) for c in configs if c.kind == "training"
             and (cur := cosine_curves(c)) is not None]
    if not found:
        return False
    ncols = min(3, len(found))
    nrows = math.ceil(len(found) / ncols)
    fig = _figure(5.5 * ncols, 4.5 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    for ax, (c, (epochs, curves)) in zip(axes, found, strict=False):
        for i, (name, values) in enumerate(curves.items()):
            style = _style(i, len(curves))
            ax.plot(epochs, values, color=style["color"], marker=style["marker"],
                    markersize=4, linewidth=1.4, label=name)
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.set_title(textwrap.fill(c.label, 45), fontsize=9)
        ax.set(xlabel="epoch", ylabel="costate cosine")
        ax.legend(loc="best")
    for ax in axes[len(found):]:
        ax.set_visible(False)
    fig.suptitle("Credit vs exact costate: cosine over training (mean over seeds)")
    fig.savefig(path)
    return True


def plot_accuracy_by_rule(configs: Sequence[Configuration], path: Path) -> bool:
    """Final test accuracy (mean ± std over seeds) per training configuration, one horizontal
    bar each, one panel per task/model; drawn when the configurations span at least two rules."""
    rows = [(c, c.row(["test_accuracy"])) for c in configs if c.kind == "training"
            and c.identity.get("rule") is not None]
    rows = [(c, r) for c, r in rows if r["test_accuracy_mean"] is not None]
    if len({c.identity["rule"] for c, _ in rows}) < 2:
        return False
    scopes = list(dict.fromkeys(c.scope for c, _ in rows))
    rules = list(dict.fromkeys(str(c.identity["rule"]) for c, _ in rows))
    fig = _figure(11, sum(1.2 + 0.6 * sum(c.scope == s for c, _ in rows) for s in scopes))
    axes = fig.subplots(len(scopes), 1, squeeze=False).ravel()
    for ax, scope in zip(axes, scopes, strict=True):
        group = [(c, r) for c, r in rows if c.scope == scope]
        for y, (c, r) in enumerate(group):
            color = _style(rules.index(str(c.identity["rule"])), len(rules))["color"]
            ax.barh(y, r["test_accuracy_mean"] * 100, xerr=r["test_accuracy_std"] * 100,
                    color=color, capsize=4)
        ax.set_yticks(range(len(group)), [textwrap.fill(f"{c.variant} (n={r['test_accuracy_n']})",
                                                        50) for c, r in group], fontsize=9)
        ax.invert_yaxis()
        ax.set(title=scope, xlabel="final test accuracy (%)")
    fig.suptitle("Final test accuracy per learning rule (mean ± std over seeds)")
    fig.savefig(path)
    return True


RULE_PLOTS = (
    ("credit_cosine.png", plot_credit_cosine, "credit costate cosine over training",
     "no eval records with credit diagnostics"),
    ("accuracy_by_rule.png", plot_accuracy_by_rule, "final test accuracy per learning rule",
     "fewer than two learning rules with a final test accuracy"),
)
