"""The ``mnist1d`` task: MNIST-1D (Greydanus 2020), generated offline, 4000 train / 1000 test; the
validation split is ``val_fraction`` of the 4000 (``carve_validation``): 3600 / 400 / 1000.

The data come from ``mnist1d.data.make_dataset(get_dataset_args())`` with the dataset seed
(default 42), never ``get_dataset()`` (it downloads). ``make_dataset`` already centres the whole set
and scales it to unit standard deviation; nothing else is done. Generation takes seconds, so the
arrays are cached in-process and on disk as ``mnist1d-seed<seed>.npz`` in ``$CHIMERA_CACHE`` (or
``~/.cache/chimera``). The disk file is written atomically; an unreadable one is regenerated.
"""

from __future__ import annotations

import functools
import os
import random
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from mnist1d.data import get_dataset_args, make_dataset

from chimera.data.tasks import TASKS, VAL_FRACTION, TaskData, carve_validation

_KEYS = ("x", "y", "x_test", "y_test")


def cache_dir() -> Path:
    """``$CHIMERA_CACHE`` if set, else ``~/.cache/chimera``."""
    return Path(os.environ.get("CHIMERA_CACHE") or Path.home() / ".cache" / "chimera")


def _generate(seed: int) -> dict[str, np.ndarray]:
    """Run the MNIST-1D generator; it reseeds ``random`` and ``np.random``, so restore both."""
    args = get_dataset_args()
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.asarray(data[k]) for k in _KEYS}


def _read(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing or unreadable."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in _KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=4)
def _arrays(seed: int, directory: Path) -> dict[str, np.ndarray]:
    path = directory / f"mnist1d-seed{seed}.npz"
    arrays = _read(path)
    if arrays is None:
        arrays = _generate(seed)
        try:
            _write(path, arrays)
        except OSError as err:
            warnings.warn(f"could not cache MNIST-1D at {path}: {err}", stacklevel=3)
    return arrays


@TASKS.register("mnist1d")
def load_mnist1d(seed: int = 42, val_fraction: float = VAL_FRACTION,
                 split_seed: int = 0) -> TaskData:
    """MNIST-1D as (N, 40) float32 sequences and int64 labels (10 classes); fresh tensor copies.
    ``seed`` generates the data set, ``split_seed`` carves the validation split."""
    a = _arrays(seed, cache_dir())
    return carve_validation(
        "mnist1d", torch.tensor(a["x"], dtype=torch.float32),
        torch.tensor(a["y"], dtype=torch.int64), torch.tensor(a["x_test"], dtype=torch.float32),
        torch.tensor(a["y_test"], dtype=torch.int64), 10, val_fraction, split_seed,
    )
