"""Targets and time to target: how many steps (and seconds) a run needs to reach a validation
accuracy, from its eval records alone.

A target is a validation accuracy per task (``"mnist1d"``) or per task and model
(``"mnist1d/cnn"``; it takes precedence over the task's). A run reaches it at its first eval
record whose ``val_accuracy`` is >= the target; its time to target is that record's ``step``
(optimizer steps since the start; the primary measure: it does not depend on the machine) and
its elapsed training seconds (:data:`SECONDS_KEY`). A run that never reaches it has an infinite
time. Evaluations happen after every epoch, so a time to target is resolved to the epoch.

Targets come from :data:`DEFAULT_TARGETS`, then ``DIR/targets.toml`` or ``DIR/targets.json``
(``{"targets": {"task" or "task/model": value}}``, the records folder's), then ``chimera report
DIR --target task=value``: each later source overrides the earlier ones key by key, a task's
entry also replacing their entries of that task's models.
"""

from __future__ import annotations

import json
import math
import statistics
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chimera._validate import fail, number, require
from chimera.bench.report.aggregate import group_by, metric_value

# Validation accuracy targets, from the bench's test accuracies (README): the digits MLP reaches
# 96.8%; on MNIST-1D the CNNs reach 92-95% (the integer-ternary CNN 88%), the plain MLP 65%, the
# ResMLP 69% with backprop and 21-38% with the other rules. Each target is reached by some
# configurations of the bench and not by all.
DEFAULT_TARGETS: dict[str, float] = {"digits": 0.95, "mnist1d": 0.60, "mnist1d/cnn": 0.90}
METRIC = "val_accuracy"  # the validation metric a target applies to (higher is better)
FALLBACK_METRIC = "test_accuracy"  # used, and flagged, for records without a validation split
SECONDS_KEY = "train_time_s"  # eval records' training seconds so far
TARGET_FILES = ("targets.toml", "targets.json")


@dataclass(frozen=True)
class RunTime:
    """One run's time to target: steps and seconds (inf: not reached; seconds None when its
    records carry no time) and the eval ``epoch`` that reached it (None: not reached)."""

    seed: Any
    steps: float
    seconds: float | None
    epoch: int | None

    @property
    def reached(self) -> bool:
        return self.epoch is not None


def check_targets(targets: Mapping[str, Any], source: str) -> dict[str, float]:
    """``targets`` as ``{key: accuracy}``; a key is a task or ``task/model`` and a value a
    number in (0, 1]."""
    require(isinstance(targets, Mapping), source, targets,
            "a table of {task or task/model = accuracy}")
    out = {}
    for key, value in targets.items():
        require(isinstance(key, str) and key.count("/") <= 1 and "" not in key.split("/"),
                f"{source} key", key, "a task name or task/model")
        out[key] = number(f"{source}[{key!r}]", value, 0.0, 1.0, low_open=True)
    return out


def parse_target_options(items: Iterable[str]) -> dict[str, float]:
    """``--target`` options ``task=value`` or ``task/model=value`` as a targets table."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        require(bool(sep), "--target", item, "TASK=ACCURACY or TASK/MODEL=ACCURACY")
        try:
            out[key.strip()] = float(raw)
        except ValueError:
            fail("--target", item, "TASK=ACCURACY with a number for ACCURACY")
    return check_targets(out, "--target")


def read_target_file(directory: str | Path) -> dict[str, float]:
    """The targets of ``directory``'s targets.toml or targets.json (``{}`` when neither exists;
    both at once is an error)."""
    paths = [Path(directory) / name for name in TARGET_FILES if (Path(directory) / name).is_file()]
    if not paths:
        return {}
    require(len(paths) == 1, "targets file", [p.name for p in paths], "one of targets.toml or "
            "targets.json")
    path = paths[0]
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"targets file {path} cannot be read: {e}") from None
    require(isinstance(data, dict) and set(data) == {"targets"}, f"targets file {path}",
            sorted(data) if isinstance(data, dict) else data, "a single [targets] table")
    return check_targets(data["targets"], f"{path.name} targets")


def override(base: Mapping[str, float], new: Mapping[str, float]) -> dict[str, float]:
    """``base`` updated by ``new``, whose task entries also drop ``base``'s ``task/...`` ones."""
    tasks = {k for k in new if "/" not in k}
    kept = {k: v for k, v in base.items() if k.split("/")[0] not in tasks or "/" not in k}
    return {**kept, **new}


def resolve_targets(directory: str | Path, overrides: Mapping[str, float] | None = None
                    ) -> dict[str, float]:
    """:data:`DEFAULT_TARGETS`, overridden (:func:`override`) by ``directory``'s targets file,
    then by ``overrides``."""
    extra = check_targets(overrides or {}, "targets")
    return override(override(DEFAULT_TARGETS, read_target_file(directory)), extra)


def target_for(targets: Mapping[str, float], task: Any, model: Any) -> float | None:
    """The target of ``task``/``model``: its own entry, else its task's, else None."""
    return targets.get(f"{task}/{model}", targets.get(str(task)))


def run_time(evals: Sequence[Mapping[str, Any]], target: float, metric: str = METRIC
             ) -> RunTime:
    """Time to ``target`` of one run from its eval records: the first (in epoch order) whose
    ``metric`` is >= ``target``."""
    ordered = sorted(evals, key=lambda r: r.get("epoch") or 0)
    seed = ordered[0].get("seed") if ordered else None
    for r in ordered:
        value = metric_value(r.get(metric))
        if value is not None and value >= target:
            return RunTime(seed, float(r["step"]), metric_value(r.get(SECONDS_KEY)),
                           r.get("epoch"))
    seconds = math.inf if all(metric_value(r.get(SECONDS_KEY)) is not None for r in ordered) \
        else None
    return RunTime(seed, math.inf, seconds, None)


def metric_of(evals: Iterable[Mapping[str, Any]]) -> str:
    """:data:`METRIC` when any eval record carries it, else :data:`FALLBACK_METRIC`."""
    return METRIC if any(METRIC in r for r in evals) else FALLBACK_METRIC


def run_times(evals: Sequence[Mapping[str, Any]], run_ids: Iterable[Any], target: float,
              metric: str) -> list[RunTime]:
    """:func:`run_time` of each run of ``run_ids`` (by seed) from a configuration's evals."""
    by_run = group_by(evals, ["run_id"])
    wanted = [by_run.get((rid,), []) for rid in run_ids]
    return sorted((run_time(e, target, metric) for e in wanted if e),
                  key=lambda t: (t.seed is None, t.seed))


def median_time(values: Sequence[float]) -> float:
    """The median over seeds with not reached = inf (AlgoPerf's rule): finite only when more
    than half of the seeds reached the target."""
    return statistics.median(values) if values else math.inf


def reached_mean(values: Sequence[float]) -> float | None:
    """The mean over the seeds that reached the target (None when none did)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None
