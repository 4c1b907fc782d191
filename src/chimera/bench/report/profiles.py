"""Performance profiles (Dolan & Moré 2002, as AlgoPerf scores them) over the time to target of
:mod:`chimera.bench.report.targets`, and report.md's "Time to target" section with its plot.

A *workload* w is a task/model of the report (a configuration's ``scope``) that has a target; a
*configuration* s is an optimizer/quantizer/rule variant (its ``variant`` label), compared on
the workloads it ran. ``t_{s,w}`` is the median over the configuration's finished seeds of the
time to target, a seed that does not reach it counting as inf (so t is finite only when more than
half of the seeds reach it), and inf where s did not run w. Then

    r_{s,w} = t_{s,w} / min_s' t_{s',w}            (inf where t_{s,w} = inf),
    rho_s(tau) = (1/n) #{w : r_{s,w} <= tau}        (n workloads),
    B_s = 1/(r_max - 1) * integral_1^{r_max} rho_s(tau) dtau
        = (1/n) sum_w max(0, r_max - r_{s,w}) / (r_max - 1)     in [0, 1],  r_max = 4.

The second form is the exact integral of the step function rho_s (AlgoPerf's code approximates
it with the trapezoid rule on a grid). A configuration more than r_max times slower than the
fastest on a workload gets no credit there, as one that never reaches the target. With one
workload the profile is the step rho_s(tau) = [tau >= r_s] and B_s = max(0, 4 - r_s) / 3: 1 for
the fastest, 0 at four times its time or when not reached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chimera._validate import number, require
from chimera.bench.report.tables import format_table
from chimera.bench.report.targets import (
    METRIC,
    RunTime,
    median_time,
    metric_of,
    reached_mean,
    run_times,
    target_for,
)

if TYPE_CHECKING:
    from chimera.bench.report.write import Configuration

R_MAX = 4.0  # AlgoPerf's upper integration limit and the plot's right edge
MEASURES = ("steps", "seconds")  # steps first: the primary, machine-independent measure
PROFILE_PNG = "performance_profile.png"
TIME_TO_TARGET_HEADING = "## Time to target"  # report.md's section, also printed by the CLI


# --- the math ----------------------------------------------------------------------------------

def performance_ratios(times: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``r[s][w] = t[s][w] / min_s' t[s'][w]`` for every configuration s and every workload w of
    ``times`` (``{s: {w: t}}``, t > 0 or inf); a pair absent from ``times`` counts as inf, and
    every ratio of a workload that no configuration reached is inf."""
    for s, per_w in times.items():
        for w, t in per_w.items():
            number(f"times[{s!r}][{w!r}]", t, 0.0, low_open=True, allow_inf=True)
    workloads = list(dict.fromkeys(w for per_w in times.values() for w in per_w))
    best = {w: min(per_w.get(w, math.inf) for per_w in times.values()) for w in workloads}
    return {s: {w: per_w.get(w, math.inf) / best[w] if math.isfinite(best[w]) else math.inf
                for w in workloads} for s, per_w in times.items()}


def _check_ratios(ratios: Sequence[float]) -> None:
    require(len(ratios) > 0, "ratios", ratios, "a non-empty sequence (one per workload)")
    for r in ratios:
        number("ratio", r, 1.0, allow_inf=True)


def profile(ratios: Sequence[float], taus: Sequence[float]) -> np.ndarray:
    """``rho(tau) = (1/n) #{w : r_w <= tau}`` at each of ``taus`` for one configuration's
    ``ratios`` over n workloads."""
    _check_ratios(ratios)
    r = np.asarray(ratios, dtype=float)
    return np.array([(r <= tau).mean() for tau in taus])


def area_score(ratios: Sequence[float], r_max: float = R_MAX) -> float:
    """``B = 1/(r_max - 1) * integral_1^r_max rho(tau) dtau``, exactly:
    ``(1/n) sum_w max(0, r_max - r_w) / (r_max - 1)``."""
    _check_ratios(ratios)
    number("r_max", r_max, 1.0, low_open=True)
    return sum(max(0.0, r_max - r) for r in ratios) / (len(ratios) * (r_max - 1.0))


# --- from configurations -----------------------------------------------------------------------

@dataclass
class TargetRow:
    """A training configuration with a target and its finished runs' times to target."""

    config: Configuration
    target: float
    metric: str
    times: list[RunTime]

    def values(self, measure: str) -> list[float] | None:
        """Per seed: steps or seconds to target (None when a run's records lack seconds)."""
        vals = [getattr(t, measure) for t in self.times]
        return None if any(v is None for v in vals) else vals


def target_rows(configs: Sequence[Configuration], targets: Mapping[str, float]
                ) -> list[TargetRow]:
    """The training configurations that have a target and finished runs."""
    rows = []
    for c in configs:
        target = target_for(targets, c.identity.get("task"), c.identity.get("model"))
        if c.kind != "training" or target is None or not c.finals:
            continue
        metric = metric_of(c.evals)
        rows.append(TargetRow(c, target, metric,
                              run_times(c.evals, [r.get("run_id") for r in c.finals], target,
                                        metric)))
    return rows


def workload_times(rows: Sequence[TargetRow], measure: str) -> dict[str, dict[str, float]] | None:
    """``{variant: {scope: median time}}`` for :func:`performance_ratios` (None when some run
    lacks the measure)."""
    times: dict[str, dict[str, float]] = {}
    for row in rows:
        vals = row.values(measure)
        if vals is None:
            return None
        times.setdefault(row.config.variant, {})[row.config.scope] = median_time(vals)
    return times


def profile_scores(rows: Sequence[TargetRow], r_max: float = R_MAX
                   ) -> dict[str, dict[str, Any]]:
    """Per measure with data: ``{"ratios": {s: {w: r}}, "scores": {s: B_s}}``."""
    out = {}
    for measure in MEASURES:
        times = workload_times(rows, measure)
        if times:
            ratios = performance_ratios(times)
            out[measure] = {"ratios": ratios, "scores": {
                s: area_score(list(r.values()), r_max) for s, r in ratios.items()}}
    return out


# --- report.md's section and the plot ----------------------------------------------------------

def _cell(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return "not reached" if math.isinf(value) else f"{value:{fmt}}"


def _time_cells(row: TargetRow, measure: str, fmt: str) -> list[str]:
    vals = row.values(measure)
    if vals is None:
        return ["-", "-"]
    return [_cell(median_time(vals), fmt), _cell(reached_mean(vals), fmt)]


def time_to_target_table(rows: Sequence[TargetRow]) -> str:
    """One line per configuration: target, seeds reaching it, median (not reached = inf) and
    mean over the reaching seeds of steps and seconds to target."""
    lines = []
    for row in rows:
        flag = "" if row.metric == METRIC else " ⚠"
        reached = sum(t.reached for t in row.times)
        lines.append({"cells": [f"{row.config.scope} · {row.config.variant}",
                                f"{row.metric} ≥ {row.target:g}{flag}",
                                f"{reached}/{len(row.times)}",
                                *_time_cells(row, "steps", ".0f"),
                                *_time_cells(row, "seconds", ".2f")]})
    headers = ("workload · configuration", "target", "seeds reached", "steps (median)",
               "steps (mean, reached)", "seconds (median)", "seconds (mean, reached)")
    return format_table(lines, [(h, lambda r, i=i: r["cells"][i]) for i, h in enumerate(headers)])


def profile_table(rows: Sequence[TargetRow], scores: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per configuration: workloads run, area scores, step ratios per workload."""
    workloads = list(dict.fromkeys(r.config.scope for r in rows))
    ran = {}
    for r in rows:
        ran.setdefault(r.config.variant, set()).add(r.config.scope)
    steps = scores.get("steps", {"ratios": {}, "scores": {}})
    seconds = scores.get("seconds", {"scores": {}})
    order = sorted(ran, key=lambda s: -steps["scores"].get(s, 0.0))
    lines = [{"cells": [s, f"{len(ran[s])}/{len(workloads)}",
                        _cell(steps["scores"].get(s), ".3f"),
                        _cell(seconds["scores"].get(s), ".3f"),
                        ", ".join(f"{w} {_ratio(steps['ratios'].get(s, {}).get(w))}"
                                  for w in workloads)]} for s in order]
    headers = ("configuration", "workloads run", "score (steps)", "score (seconds)",
               "steps / fastest, per workload")
    return format_table(lines, [(h, lambda r, i=i: r["cells"][i]) for i, h in enumerate(headers)])


def _ratio(r: float | None) -> str:
    return "-" if r is None else "∞" if math.isinf(r) else f"{r:.2f}"


def section_lines(rows: Sequence[TargetRow], scores: Mapping[str, Mapping[str, Any]],
                  untargeted: Sequence[str]) -> list[str]:
    """report.md's "Time to target" section (empty without a configuration with a target)."""
    if not rows:
        return []
    lines = ["", TIME_TO_TARGET_HEADING, "",
             f"A run reaches its target at its first eval record whose `{METRIC}` is ≥ the "
             "target; its time to target is that record's optimizer step count (the primary "
             "measure, independent of the machine) and its training seconds. Medians count a "
             "seed that never reaches the target as ∞ (finite only when more than half of the "
             "seeds reach it); means are over the seeds that reach it. Targets: "
             "docs/protocol.md, `targets.toml` in the records folder, or `chimera report "
             "--target TASK=ACC`."
             + (" ⚠: the records have no validation split, the test accuracy stands in."
                if any(r.metric != METRIC for r in rows) else ""), "",
             time_to_target_table(rows), "",
             "### Performance profile", "",
             "Workloads: the task/models above; configurations: their optimizer/quantizer/rule "
             "variants. Score = (1/(r_max−1)) ∫₁^r_max ρ(τ) dτ with r_max = 4, ρ(τ) the fraction "
             "of workloads on which the configuration's median time to target is within τ times "
             "the fastest configuration's (a workload it did not run or reach counts as ∞); "
             "1 = fastest everywhere, 0 = never within 4×.", "",
             profile_table(rows, scores)]
    if untargeted:
        lines += ["", f"No target for {', '.join(untargeted)}."]
    return lines


def plot_profiles(scores: Mapping[str, Mapping[str, Any]], path: Path,
                  r_max: float = R_MAX) -> bool:
    """rho_s(tau) for tau in [1, r_max], one panel per measure (False, nothing written, when
    no configuration reached its target)."""
    from chimera.bench.report.plots import _figure, _style

    steps = scores.get("steps", {"ratios": {}})["ratios"]
    if not any(math.isfinite(r) for per_w in steps.values() for r in per_w.values()):
        return False
    fig = _figure(6.5 * len(scores), 5.0)
    axes = fig.subplots(1, len(scores), squeeze=False).ravel()
    for ax, (measure, data) in zip(axes, scores.items(), strict=True):
        ratios = data["ratios"]
        for i, (s, per_w) in enumerate(ratios.items()):
            r = list(per_w.values())
            taus = sorted({1.0, r_max, *(x for x in r if x <= r_max)})
            style = _style(i, len(ratios))
            ax.step(taus, profile(r, taus), where="post", color=style["color"],
                    linestyle=style["linestyle"], linewidth=1.8,
                    label=f"{s} ({data['scores'][s]:.2f})")
        ax.set(xlim=(1.0, r_max), ylim=(-0.02, 1.02), title=f"time to target in {measure}",
               xlabel=f"τ ({measure} / fastest configuration's)",
               ylabel="ρ(τ): fraction of workloads within τ")
        ax.legend(loc="lower right")
    fig.suptitle("Performance profiles (legend: area score)")
    fig.savefig(path)
    return True


def time_to_target_report(configs: Sequence[Configuration], targets: Mapping[str, float],
                          out_dir: Path) -> tuple[list[str], list[Path], list[str]]:
    """report.md's section, the profile PNG written into ``out_dir`` (a list of one or none) and
    the plot list's lines about it."""
    rows = target_rows(configs, targets)
    untargeted = sorted({c.scope for c in configs if c.kind == "training"}
                        - {r.config.scope for r in rows})
    scores = profile_scores(rows)
    what = "performance profiles over the time to target"
    if plot_profiles(scores, out_dir / PROFILE_PNG):
        notes = [f"- `{PROFILE_PNG}`: {what}.", "", f"  ![{what}]({PROFILE_PNG})"]
        return section_lines(rows, scores, untargeted), [out_dir / PROFILE_PNG], notes
    return (section_lines(rows, scores, untargeted), [],
            [f"- `{PROFILE_PNG}`: skipped (no configuration reached a target)."])
