"""``chimera bench``: the main job on embedded data, declared as a suite shipped with the package
(``chimera/bench/suites/bench.toml``): the stress problems, digits, MNIST-1D optimizers,
quantizers and learning rules, and the toy LQ check in short form.

Record files in the output folder are rewritten on every run (no resume); the printed tables are
also saved as ``summary.md`` there, and ``chimera report``'s report.md, report.csv and plots are
written beside them.
"""

from __future__ import annotations

import copy
import functools
import os
import tomllib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from chimera.bench.lock import folder_lock
from chimera.bench.report.write import write_report
from chimera.bench.suite.execute import run_suite
from chimera.bench.suite.schema import load_suite

BENCH_SUITE = ("suites", "bench.toml")  # inside the chimera.bench package
# The grids whose epochs --quant-epochs and --rule-epochs set (--epochs sets the others').
QUANT_GRID, RULE_GRID = "quant", "rules"


def bench_suite() -> dict[str, Any]:
    """The packaged bench suite, parsed (not yet validated)."""
    text = resources.files("chimera.bench").joinpath(*BENCH_SUITE).read_text(encoding="utf-8")
    return tomllib.loads(text)


def override_suite(
    data: dict[str, Any], *, seeds: Sequence[int] | None = None, epochs: int | None = None,
    quant_epochs: int | None = None, rule_epochs: int | None = None,
    stress_steps: int | None = None, toy_lq_steps: int | None = None,
) -> dict[str, Any]:
    """A copy of the parsed suite ``data`` with the bench's overrides (None: keep the suite's):
    ``seeds`` everywhere, ``quant_epochs`` / ``rule_epochs`` of the grids named ``quant`` /
    ``rules``, ``epochs`` of the other grids, and the steps of ``[stress]`` / ``[toy_lq]``.
    Tables of the wrong type are left for :func:`load_suite` to reject."""
    data = copy.deepcopy(data)
    grids = data.get("grid", [data])
    grids = [g for g in grids if isinstance(g, dict)] if isinstance(grids, list) else []
    sections = {k: data[k] for k in ("stress", "toy_lq") if isinstance(data.get(k), dict)}
    if seeds is not None:
        for table in [data, *grids, *sections.values()]:
            table.pop("seeds", None)
        data["seeds"] = list(seeds)
    for grid in grids:
        grid_epochs = {QUANT_GRID: quant_epochs, RULE_GRID: rule_epochs}.get(grid.get("name"),
                                                                             epochs)
        if grid_epochs is not None:
            grid["epochs"] = grid_epochs
    for key, steps in (("stress", stress_steps), ("toy_lq", toy_lq_steps)):
        if steps is not None and key in sections:
            sections[key]["steps"] = steps
    return data


def run_bench(
    out: str | os.PathLike,
    seeds: Sequence[int] | None = None,
    stress_steps: int | None = None,
    epochs: int | None = None,
    quant_epochs: int | None = None,
    rule_epochs: int | None = None,
    toy_lq_steps: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    suite: str | os.PathLike | None = None,
    *,
    wait: bool = False,
) -> str:
    """Run the bench suite (or the suite file ``suite``) with the overrides of
    :func:`override_suite` into ``out``, write the report there and return the summary
    (markdown, also in ``out/summary.md``).

    Everything runs on one pool of ``workers`` processes (default: the cores available), one
    torch thread each; every record file is rewritten. ``out`` stays locked until the report is
    written: while another process writes into it this raises one ``ValueError`` line naming
    that process, or with ``wait`` waits for it to finish.
    """
    edit = functools.partial(override_suite, seeds=seeds, epochs=epochs,
                             quant_epochs=quant_epochs, rule_epochs=rule_epochs,
                             stress_steps=stress_steps, toy_lq_steps=toy_lq_steps)
    if suite is None:
        built = load_suite(bench_suite(), "the bench suite (chimera/bench/suites/bench.toml)",
                           edit=edit)
    else:
        built = load_suite(suite, edit=edit)
    with folder_lock(out, wait) as folder:
        summary = run_suite(built, folder, workers, progress, resume=False,
                            desc=built.name or "bench")
        write_report(folder)
    return summary
