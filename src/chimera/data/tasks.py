"""Classification tasks: the ``TaskData`` container, the ``TASKS`` registry and ``load_task``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from chimera.registry import Registry


@dataclass(frozen=True)
class TaskData:
    """A train/test split: float32 inputs ``x_*`` (N, *input_shape), int64 labels ``y_*`` (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])


TASKS: Registry[Callable[..., TaskData]] = Registry("task", "chimera.tasks")


def load_task(name: str, **kwargs) -> TaskData:
    """Build the task registered as ``name``; ``kwargs`` go to its loader."""
    return TASKS.get(name)(**kwargs)
