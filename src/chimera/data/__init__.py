"""Tasks (docs/algorithms.md#tasks): ``load_task(name) -> TaskData``; the stress problems are in
``.stress_problems``."""

from chimera.data import cifar10, digits, mnist1d, synthetic  # noqa: F401  (registers tasks)
from chimera.data.tasks import TASKS, TaskData, load_task

__all__ = ["TASKS", "TaskData", "load_task"]
