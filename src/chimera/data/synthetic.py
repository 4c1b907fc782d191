"""``synthetic_images``: random CIFAR-shaped tensors with random labels, for smoke and speed runs.

There is nothing to learn in them beyond memorising the training set. ``n_train`` examples are
drawn and ``val_fraction`` of them carved off as the validation split (``carve_validation``):
461 train / 51 validation / 128 test by default.
"""

from __future__ import annotations

import torch

from chimera._validate import integer
from chimera.data.tasks import TASKS, VAL_FRACTION, TaskData, carve_validation


@TASKS.register("synthetic_images")
def load_synthetic_images(
    n_train: int = 512, n_test: int = 128, image_size: int = 32, num_classes: int = 10,
    seed: int = 0, val_fraction: float = VAL_FRACTION, split_seed: int = 0,
) -> TaskData:
    """x ~ N(0, 1) of shape (N, 3, image_size, image_size), uniform labels; seeded."""
    for name, value, low in [("n_train", n_train, 1), ("n_test", n_test, 1),
                             ("image_size", image_size, 4), ("num_classes", num_classes, 2)]:
        integer(name, value, low)
    g = torch.Generator().manual_seed(seed)
    shape = (3, image_size, image_size)
    return carve_validation(
        "synthetic_images", torch.randn(n_train, *shape, generator=g),
        torch.randint(num_classes, (n_train,), generator=g),
        torch.randn(n_test, *shape, generator=g),
        torch.randint(num_classes, (n_test,), generator=g), num_classes, val_fraction,
        split_seed,
    )
