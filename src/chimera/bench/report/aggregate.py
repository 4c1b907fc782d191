"""The harness's one statistics module: records grouped by keys, and per group, for every metric,
the statistics over the group's runs (seeds) that the summary tables, report.md and report.csv
all show.

For a metric with values x_1..x_n (the numeric values among the group's records):

    mean = (1/n) sum_i x_i,   std = sqrt(sum_i (x_i - mean)^2 / (n - 1))   (0 when n = 1),
    CI = mean ± t_{(1+confidence)/2, n-1} * std / sqrt(n)      (Student t; none when n < 2).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from scipy.stats import t as student_t

STAT_KEYS = ("mean", "std", "n", "ci_low", "ci_high")  # a metric's columns: f"{metric}_{key}"


def metric_value(value: Any) -> float | None:
    """A metric value as a float, or None for absent / non-numeric values (booleans, per-layer
    lists, strings)."""
    is_num = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if is_num else None


def group_by(records: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Records grouped by the values of ``keys``, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups


def seed_stats(values: Iterable[Any], confidence: float = 0.95) -> dict[str, Any]:
    """``mean``, sample ``std`` (ddof=1; 0 for one value), ``n`` and the Student-t interval
    ``ci_low``/``ci_high`` (None when n < 2) of the numeric ``values`` (others are skipped);
    mean and std are None when n = 0."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    vals = [v for v in map(metric_value, values) if v is not None]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci_low": None, "ci_high": None}
    mean = statistics.fmean(vals)
    if n == 1:
        return {"mean": mean, "std": 0.0, "n": 1, "ci_low": None, "ci_high": None}
    std = statistics.stdev(vals)
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def metric_stats(records: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """``{metric}_{mean,std,n,ci_low,ci_high}`` (:func:`seed_stats`, 95%) over ``records`` for
    every metric: the statistics of one group."""
    out: dict[str, Any] = {}
    for m in metrics:
        stats = seed_stats(r.get(m) for r in records)
        out.update({f"{m}_{k}": stats[k] for k in STAT_KEYS})
    return out


def summarize(
    records: Iterable[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per group of ``keys``: the key values, ``seeds`` (the sorted seeds of the group)
    and :func:`metric_stats` of the group."""
    rows = []
    for key, recs in group_by(records, keys).items():
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["seeds"] = sorted(r["seed"] for r in recs if "seed" in r)
        rows.append({**row, **metric_stats(recs, metrics)})
    return rows
