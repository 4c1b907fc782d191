"""The ``digits`` task: scikit-learn's bundled 8x8 digits (1797 images, 10 classes), no download.

Inputs are the 64 pixel intensities divided by 16 (range [0, 1]); no further standardisation. The
test split is stratified and deterministic (``train_test_split(..., random_state=split_seed)``);
the validation split is ``val_fraction`` of what remains (``carve_validation``, same
``split_seed``): 1293 train / 144 validation / 360 test by default.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from chimera._validate import number
from chimera.data.tasks import TASKS, VAL_FRACTION, TaskData, carve_validation


@TASKS.register("digits")
def load_digits_task(test_fraction: float = 0.2, split_seed: int = 0,
                     val_fraction: float = VAL_FRACTION) -> TaskData:
    """Digits as (N, 64) float32 in [0, 1]; ``test_fraction`` of each class goes to the test set,
    ``val_fraction`` of the rest to the validation set."""
    number("test_fraction", test_fraction, 0, 1, low_open=True, high_open=True)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    return carve_validation(
        "digits", torch.tensor(x_train, dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.int64), torch.tensor(x_test, dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.int64), 10, val_fraction, split_seed,
    )


@TASKS.register("digits_2d")
def load_digits_2d(test_fraction: float = 0.2, split_seed: int = 0,
                   val_fraction: float = VAL_FRACTION) -> TaskData:
    """The same splits as ``digits`` with each example shaped as a 1x8x8 image (for ResNet-20)."""
    d = load_digits_task(test_fraction, split_seed, val_fraction)
    return TaskData(name="digits_2d", x_train=d.x_train.view(-1, 1, 8, 8), y_train=d.y_train,
                    x_val=d.x_val.view(-1, 1, 8, 8), y_val=d.y_val,
                    x_test=d.x_test.view(-1, 1, 8, 8), y_test=d.y_test,
                    num_classes=d.num_classes)
