"""Classification tasks: the ``TaskData`` container, the ``TASKS`` registry, ``load_task`` and the
validation carve every loader applies to its training data
(docs/algorithms.md#classification-tasks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from chimera._validate import integer, number, require
from chimera.registry import Registry

VAL_FRACTION = 0.1  # every task's default share of its training data held out for validation


@dataclass(frozen=True)
class TaskData:
    """Train / validation / test splits: float32 inputs ``x_*`` (N, *input_shape), int64 labels
    ``y_*`` (N,). The validation split is carved from the training data (:func:`carve_validation`);
    model selection uses it, never the test split."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            n, m = len(getattr(self, f"x_{split}")), len(getattr(self, f"y_{split}"))
            require(n == m > 0, f"the {split} split", f"{n} inputs, {m} labels",
                    "as many inputs as labels, at least one")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])


def validation_indices(labels: torch.Tensor, val_fraction: float = VAL_FRACTION,
                       split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ``(train, val)`` indices into ``labels``: a stratified, seeded hold-out.

    ``n_val = floor(val_fraction * n + 1/2)``; class c (n_c examples) gets
    ``floor(n_val * n_c / n)`` of them, and the classes with the largest remainders (ties: the
    smaller label) one more, so the sizes add up to ``n_val``. Within each class (ascending
    labels) the validation examples are the first of a permutation drawn from
    ``torch.Generator().manual_seed(split_seed)``: the carve depends on the labels and
    ``split_seed`` only, never on a run's seed.
    """
    number("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
    split_seed = integer("split_seed", split_seed)
    n = len(labels)
    n_val = int(val_fraction * n + 0.5)
    require(0 < n_val < n, "val_fraction", val_fraction,
            f"a share of the {n} training examples leaving at least one for validation and "
            "one for training")
    classes, counts = torch.unique(labels, return_counts=True)
    quotas = [n_val * int(c) // n for c in counts]
    by_remainder = sorted(range(len(classes)), key=lambda i: (-(n_val * int(counts[i]) % n), i))
    for i in by_remainder[: n_val - sum(quotas)]:
        quotas[i] += 1
    gen = torch.Generator().manual_seed(split_seed)
    picked = []
    for c, quota in zip(classes, quotas, strict=True):
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:quota]])
    val = torch.cat(picked).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


def carve_validation(name: str, x_train: torch.Tensor, y_train: torch.Tensor,
                     x_test: torch.Tensor, y_test: torch.Tensor, num_classes: int,
                     val_fraction: float = VAL_FRACTION, split_seed: int = 0) -> TaskData:
    """A ``TaskData`` whose validation split is :func:`validation_indices` of the training data
    (the rest, in its original order, is the training split); the test split is unchanged."""
    train, val = validation_indices(y_train, val_fraction, split_seed)
    return TaskData(name=name, x_train=x_train[train], y_train=y_train[train],
                    x_val=x_train[val], y_val=y_train[val], x_test=x_test, y_test=y_test,
                    num_classes=num_classes)


TASKS: Registry[Callable[..., TaskData]] = Registry("task", "chimera.tasks")


def load_task(name: str, **kwargs) -> TaskData:
    """Build the task registered as ``name``; ``kwargs`` go to its loader."""
    return TASKS.get(name)(**kwargs)
