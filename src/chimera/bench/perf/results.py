"""What a perf run reports: its goals, the printed table, and one record per row and per goal.

Every target prints a header line (device, threads, torch), its table, one line per goal (met /
not met) and writes one ``summary`` record per table row (``kind: "case"``) and per goal
(``kind: "goal"``), each with ``benchmark: "perf-<target>"`` and the machine fields (schema in
docs/records.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from chimera.bench.perf.target import Setup
from chimera.bench.report.tables import format_table
from chimera.run.records import RecordWriter


def goal(name: str, value: float | None, op: str, limit: float) -> dict[str, Any]:
    """A goal ``value op limit`` (op ``<=`` or ``>=``); ``met`` is None when not measured."""
    met = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"goal": name, "value": value, "op": op, "limit": limit, "met": met}


def goal_line(g: dict[str, Any]) -> str:
    verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
    value = "-" if g["value"] is None else f"{g['value']:.3f}"
    return f"goal {g['goal']}: {value} (goal {g['op']} {g['limit']}) -> {verdict}"


def fmt(value: float | None, spec: str = ".2f") -> str:
    """A table cell: ``value`` formatted, '-' for None."""
    return "-" if value is None else format(value, spec)


def report(
    benchmark: str,
    setup: Setup,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, Callable[[dict], Any]]],
    goals: Sequence[dict[str, Any]],
    notes: Sequence[str] = (),
) -> None:
    """Print the header, table, notes and goals; append one record per row and per goal."""
    m = setup.machine
    print(f"{benchmark} on {m['device']} ({m['device_name']}), {m['threads']} torch threads, "
          f"torch {m['versions']['torch']}")
    print(format_table(rows, columns))
    for line in [*notes, *map(goal_line, goals)]:
        print(line)
    with RecordWriter(setup.out, {"benchmark": benchmark, **m}) as writer:
        for row in rows:
            writer.write("summary", kind="case", **row)
        for g in goals:
            writer.write("summary", kind="goal", **g)
    print(f"records: {setup.out}")
