"""Tasks (docs/algorithms.md#tasks): ``load_task(name) -> TaskData`` with train / validation / test
splits (the validation split carved from the training data by
``chimera.data.tasks.validation_indices``); the stress problems are in ``.stress_problems``."""

from chimera.data import cifar10, digits, mnist1d, synthetic  # noqa: F401  (registers tasks)
from chimera.data.tasks import (
    TASKS,
    VAL_FRACTION,
    TaskData,
    carve_validation,
    load_task,
    validation_indices,
)

__all__ = ["TASKS", "VAL_FRACTION", "TaskData", "carve_validation", "load_task",
           "validation_indices"]
