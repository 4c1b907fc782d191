"""Aggregate records over seeds and print aligned text tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def group_by(records: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Records grouped by the values of ``keys``, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (ddof=1; 0 for one value) and count of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), std, len(vals)


def summarize(
    records: Iterable[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per group of ``keys``: for every metric ``{metric}_mean``, ``_std``, ``_n``,
    plus ``seeds`` (sorted seeds of the group)."""
    rows = []
    for key, recs in group_by(records, keys).items():
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["seeds"] = sorted(r["seed"] for r in recs if "seed" in r)
        for m in metrics:
            mean, std, n = mean_std(r.get(m) for r in recs)
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n})
        rows.append(row)
    return rows


def pm(row: dict[str, Any], metric: str, fmt: str = ".4f", scale: float = 1.0) -> str:
    """``mean ± std`` of ``metric`` in a summary row ('-' when absent)."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None:
        return "-"
    return f"{mean * scale:{fmt}} ± {std * scale:{fmt}}"


def key_columns(*keys: str) -> list[tuple[str, Callable[[dict], Any]]]:
    """Leading table columns: the grouping ``keys`` as they are, then the seeds of the group."""
    return [*((k, lambda r, k=k: r[k]) for k in keys),
            ("seeds", lambda r: ",".join(map(str, r["seeds"])))]


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict], Any]]]
) -> str:
    """A markdown-compatible table: ``columns`` are (header, row -> cell) pairs."""
    cells = [[str(fn(r)) for _, fn in columns] for r in rows]
    headers = [h for h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(c) for c in cells)])
