"""``chimera perf``: ours against PyTorch's fastest equivalent, measured side by side in one run.

Each benchmark target (``optim``, ``layers``, ``rules``) lives in its own module and registers
itself in ``PERF_TARGETS`` as a :class:`PerfTarget` (how to add its command-line options and how
to run it: rows of a table, also written as records). The modules they share, by role:
``target`` (registration, common options, the resolved ``Setup``), ``timing`` (interleaved
timing, profiling) and ``results`` (goals, table, records).
"""

from __future__ import annotations

from chimera.bench.perf import layer_step, optim_step, rule_step  # noqa: F401  (registers the targets)
from chimera.bench.perf.target import PERF_TARGETS, PerfTarget

__all__ = ["PERF_TARGETS", "PerfTarget"]
