"""report.md's tuning section (``chimera tune``): per configuration, the validation metric of every
candidate the search tried, mean ± std over the tuning seeds, as tables and the plot
``tuning_sensitivity.png`` (with a learning rate tuned: the lr-sensitivity curve).

Tuning runs are those whose final record has ``phase = "tune"``; they carry the tuned addresses
(``tune_params``: ``TABLE.KEY`` of the spec's hyper-parameter tables) and the metric
(``tune_metric``). Their configuration is the run spec without its seed and tuned values, their
candidate the tuned values. They are kept out of the report's other tables. The candidate marked
chosen is the one :mod:`chimera.bench.jobs.tune` chose: the best mean over seeds that all gave a
finite value (:func:`~chimera.bench.suite.sections.best_candidate`, one rule for both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chimera.bench.report.aggregate import group_by, metric_value, seed_stats
from chimera.bench.report.plots import RC, _figure, _style
from chimera.bench.suite.sections import TUNE_METRICS, best_candidate, candidate_key, seed_mean
from chimera.run.spec import RunSpec

PLOT_NAME = "tuning_sensitivity.png"
LOG_SPREAD = 20.0  # a log x axis when the largest candidate exceeds the smallest this much
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec) if f.name != "seed")


@dataclass
class Curve:
    """One configuration's search: per candidate (its values, in ``params`` order) the metric's
    values over the tuning seeds (None: not a finite number)."""

    label: str
    params: tuple[str, ...]
    metric: str
    points: list[tuple[tuple, list[float | None]]]

    def rows(self) -> list[tuple[tuple, dict[str, Any], int]]:
        """(candidate, statistics over seeds, number of runs), sorted by candidate."""
        return [(c, seed_stats(v), len(v))
                for c, v in sorted(self.points, key=lambda p: candidate_key(p[0]))]

    def chosen(self) -> tuple | None:
        """The candidate ``chimera tune`` chose: :func:`best_candidate` of the means over seeds
        (:func:`seed_mean`: None unless every seed gave a value)."""
        candidates = [c for c, _ in self.points]
        i = best_candidate(candidates, [seed_mean(v) for _, v in self.points],
                           TUNE_METRICS.get(self.metric) == "maximize")
        return None if i is None else candidates[i]


def split_tuning(records: Iterable[dict[str, Any]]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records of every other run, and those of ``chimera tune``'s search runs."""
    rest, tuning = [], []
    for r in records:
        (tuning if r.get("phase") == "tune" else rest).append(r)
    return rest, tuning


def _value(record: dict[str, Any], address: str) -> Any:
    table, _, key = address.partition(".")
    return (record.get(table) or {}).get(key)


def _base(record: dict[str, Any], params: Sequence[str]) -> dict[str, Any]:
    """The run's spec fields without its seed and tuned values."""
    base = {f: record.get(f) for f in SPEC_FIELDS}
    for address in params:
        table, _, key = address.partition(".")
        base[table] = {k: v for k, v in (base.get(table) or {}).items() if k != key}
    return base


def tuning_curves(records: Iterable[dict[str, Any]]) -> list[Curve]:
    """The curves of the tuning runs' final records (the last per run), first-seen order."""
    finals = [r for r in records if r.get("record_type") == "final" and r.get("phase") == "tune"]
    last = {r.get("run_id"): r for r in finals}
    curves: list[Curve] = []
    for (_, params, metric), runs in group_by(
            ({**r, "_base": json.dumps(_base(r, r.get("tune_params") or []), sort_keys=True),
              "_params": tuple(r.get("tune_params") or [])} for r in last.values()),
            ["_base", "_params", "tune_metric"]).items():
        points: dict[str, tuple[tuple, list[float | None]]] = {}
        for r in runs:
            candidate = tuple(_value(r, a) for a in params)
            points.setdefault(json.dumps(candidate), (candidate, []))[1].append(
                metric_value(r.get(metric)))
        r = runs[0]
        label = f"{r.get('task')}/{r.get('model')} {r.get('optimizer')} {r.get('quantizer')} " \
                f"{r.get('rule')}"
        digest = hashlib.sha1(r["_base"].encode()).hexdigest()[:8]
        curves.append(Curve(f"{label} #{digest}", params, str(metric), list(points.values())))
    labels = [c.label.rsplit(" #", 1)[0] for c in curves]
    for c, short in zip(curves, labels, strict=True):
        if labels.count(short) == 1:
            c.label = short
    return curves


def _cell(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


def curve_table(curve: Curve) -> str:
    """One row per candidate: its values, the metric's mean ± std, the seeds, the chosen one."""
    chosen = curve.chosen()
    head = [*curve.params, f"{curve.metric} (mean ± std)", "seeds", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for candidate, stats, n in curve.rows():
        value = "-" if stats["mean"] is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"
        note = "★ chosen" if candidate == chosen else "" if stats["n"] == n else \
            f"⚠ {n - stats['n']} of {n} without a finite value"
        lines.append("| " + " | ".join([*map(_cell, candidate), value, str(n), note]) + " |")
    return "\n".join(lines)


def plot_sensitivity(curves: Sequence[Curve], path: Path) -> None:
    """Per tuned address a panel: the metric's mean ± std over seeds against the candidate's
    value, one line per configuration (numbers on a log axis when they spread, other values as
    categories)."""
    addresses = list(dict.fromkeys(a for c in curves for a in c.params))
    fig = _figure(7.5 * len(addresses), 5.5)
    axes = fig.subplots(1, len(addresses), squeeze=False).ravel()
    for ax, address in zip(axes, addresses, strict=True):
        values = [cand[curve.params.index(address)] for curve in curves
                  if address in curve.params for cand, _ in curve.points]
        numeric = all(metric_value(v) is not None for v in values)
        categories = sorted({json.dumps(v) for v in values})
        for i, curve in enumerate(c for c in curves if address in c.params):
            rows = [(cand[curve.params.index(address)], s) for cand, s, _ in curve.rows()
                    if s["mean"] is not None]
            xs = [x if numeric else categories.index(json.dumps(x)) for x, _ in rows]
            style = _style(i, len(curves))
            ax.errorbar(xs, [s["mean"] for _, s in rows], yerr=[s["std"] for _, s in rows],
                        color=style["color"], marker=style["marker"], capsize=3,
                        linestyle=style["linestyle"] if len(curve.params) == 1 else "none",
                        label=curve.label)
        if numeric and min(values) > 0 and max(values) / min(values) > LOG_SPREAD:
            ax.set_xscale("log")
        elif not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set(xlabel=address, ylabel=curves[0].metric)
        ax.legend()
    fig.suptitle("Tuning: validation metric vs candidate (mean ± std over the tuning seeds)")
    fig.savefig(path)


def sensitivity_report(records: Iterable[dict[str, Any]], out_dir: Path
                       ) -> tuple[list[str], list[Path], list[str]]:
    """report.md's tuning section (its lines), the plot written into ``out_dir`` and report.md's
    note on it; nothing when the records hold no tuning run."""
    from matplotlib import rc_context

    curves = tuning_curves(records)
    if not curves:
        return [], [], []
    lines = ["", "## Tuning: validation metric vs candidate", "",
             "The search runs of `chimera tune` (records with phase \"tune\"): per "
             "configuration, the final validation metric of every candidate, over the tuning "
             "seeds; the chosen candidate has the best mean among those whose seeds all gave a "
             "finite value."]
    for curve in curves:
        lines += ["", f"### {curve.label}", "", curve_table(curve)]
    with rc_context(RC):
        plot_sensitivity(curves, out_dir / PLOT_NAME)
    what = "validation metric vs tuning candidate per configuration"
    return lines, [out_dir / PLOT_NAME], [f"- `{PLOT_NAME}`: {what}.", "",
                                          f"  ![{what}]({PLOT_NAME})"]
