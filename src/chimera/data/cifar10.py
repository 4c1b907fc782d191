"""The ``cifar10`` task: CIFAR-10 read from the standard python pickle batches in a local directory.

Nothing is downloaded. The directory is ``data_dir`` or else ``$CHIMERA_DATA``; it holds the batch
files (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) either directly or in the
``cifar-10-batches-py/`` folder that the "CIFAR-10 python version" archive extracts to. Each batch
is a pickled dict: ``b"data"`` a (n, 3072) uint8 array of row-major R, G, B planes of 32x32 images,
``b"labels"`` n ints in 0..9. Pixels are scaled to [0, 1] and, with ``normalize``, standardised per
channel: ``x = (p / 255 - mean_c) / std_c``. The validation split is ``val_fraction`` of the
50000 training images, stratified and seeded by ``split_seed`` (``carve_validation``): 500 per
class by default, 45000 / 5000 / 10000. The files are unpickled, so point this at trusted files
only.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from chimera._validate import integer
from chimera.data.tasks import TASKS, VAL_FRACTION, TaskData, carve_validation

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBDIR = "cifar-10-batches-py"
NUM_CLASSES = 10
_PIXELS = 3 * 32 * 32
_WHERE = (
    "download the 'CIFAR-10 python version' archive (cifar-10-python.tar.gz) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and extract it"
)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the batch files: ``data_dir`` (else ``$CHIMERA_DATA``) or its
    ``cifar-10-batches-py/`` subfolder when that exists."""
    source = "data_dir"
    if data_dir is None:
        data_dir, source = os.environ.get("CHIMERA_DATA"), "CHIMERA_DATA"
        if not data_dir:
            raise ValueError(
                "cifar10 needs a data directory: pass data_dir or set the CHIMERA_DATA environment "
                f"variable (export CHIMERA_DATA=/path/to/data); {_WHERE} there"
            )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"CIFAR-10 directory {str(root)!r} (from {source}) does not exist or is not a "
            f"directory; {_WHERE} there"
        )
    nested = root / SUBDIR
    return nested if nested.is_dir() else root


def _read_batch(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(data (n, 3072) uint8, labels (n,) int64) of one batch file, validated."""
    path = folder / name
    if not path.is_file():
        raise ValueError(
            f"CIFAR-10 batch file {name!r} not found in {str(folder)!r}; expected "
            f"{', '.join(TRAIN_FILES)} and {TEST_FILE} there or in a {SUBDIR}/ subfolder "
            f"({_WHERE})"
        )
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # a damaged pickle can fail in many ways
        raise ValueError(
            f"CIFAR-10 batch file {str(path)!r} is truncated or corrupt "
            f"({type(err).__name__}: {err}); extract it again"
        ) from err

    def bad(what: str) -> ValueError:
        return ValueError(f"CIFAR-10 batch file {str(path)!r} has the wrong format: {what}")

    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = (", ".join(sorted(map(repr, batch))) or "no keys") if isinstance(batch, dict) \
            else f"a {type(batch).__name__}"
        raise bad(f"expected a dict with keys b'data' and b'labels', found {found}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise bad(f"b'data' must be uint8 of shape (n, {_PIXELS}), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or (labels.size and labels.dtype.kind not in "iu"):
        raise bad(f"b'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if labels.size and not (labels.min() >= 0 and labels.max() < NUM_CLASSES):
        raise bad(
            f"labels must lie in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}"
        )
    return data, labels.astype(np.int64)


def _images(data: np.ndarray, normalize: bool) -> torch.Tensor:
    """(n, 3072) uint8 -> (n, 3, 32, 32) float32: ``p / 255``, then ``(. - mean) / std``."""
    x = torch.from_numpy(data).view(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    if normalize:
        x.sub_(torch.tensor(MEAN).view(3, 1, 1)).div_(torch.tensor(STD).view(3, 1, 1))
    return x


@TASKS.register("cifar10")
def load_cifar10(data_dir: str | os.PathLike | None = None, normalize: bool = True,
                 val_fraction: float = VAL_FRACTION, split_seed: int = 0) -> TaskData:
    """CIFAR-10 as (N, 3, 32, 32) float32 images and int64 labels (45000 train / 5000 validation
    carved from the 50000 training images / 10000 test)."""
    folder = resolve_data_dir(data_dir)
    train = [_read_batch(folder, name) for name in TRAIN_FILES]
    x_test, y_test = _read_batch(folder, TEST_FILE)
    return carve_validation(
        "cifar10", _images(np.concatenate([d for d, _ in train]), normalize),
        torch.from_numpy(np.concatenate([y for _, y in train])), _images(x_test, normalize),
        torch.from_numpy(y_test), NUM_CLASSES, val_fraction, split_seed,
    )


def write_cifar10_fixture(directory: str | os.PathLike, n_per_batch: int = 4,
                          seed: int = 0) -> Path:
    """Write a tiny CIFAR-10 in the real on-disk format into ``directory`` (created) and return
    it: random uint8 pixels, labels cycling through 0..9, plus ``batches.meta``. For tests."""
    n_per_batch = integer("n_per_batch", n_per_batch, 1)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate((*TRAIN_FILES, TEST_FILE)):
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(n_per_batch, _PIXELS), dtype=np.uint8),
            b"labels": [(i + j) % NUM_CLASSES for j in range(n_per_batch)],
            b"filenames": [f"{name}_{j}.png".encode() for j in range(n_per_batch)],
        }
        (out / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                             b"frog", b"horse", b"ship", b"truck"],
            b"num_cases_per_batch": n_per_batch, b"num_vis": _PIXELS}
    (out / "batches.meta").write_bytes(pickle.dumps(meta))
    return out
