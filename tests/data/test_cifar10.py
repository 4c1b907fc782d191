import pickle
import re

import numpy as np
import pytest
import torch

from chimera.data.cifar10 import (
    MEAN,
    STD,
    SUBDIR,
    TEST_FILE,
    TRAIN_FILES,
    load_cifar10,
    write_cifar10_fixture,
)
from chimera.data.tasks import TASKS, load_task

N = 3  # images per batch file


@pytest.fixture
def flat(tmp_path):
    """Batch files directly in the directory."""
    return write_cifar10_fixture(tmp_path / "flat", n_per_batch=N)


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("CHIMERA_DATA", raising=False)


def _q(path) -> str:
    """Regex for ``path`` as the messages quote it."""
    return re.escape(repr(str(path)))


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj))


def test_registered_and_loaded_through_load_task(flat):
    assert "cifar10" in TASKS
    d = load_task("cifar10", data_dir=str(flat))
    assert d.name == "cifar10" and d.num_classes == 10 and d.input_shape == (3, 32, 32)
    # 10% of the 15 training images (rounded: 2) are carved off for validation
    assert d.x_train.shape == (5 * N - 2, 3, 32, 32) and d.x_val.shape == (2, 3, 32, 32)
    assert d.x_test.shape == (N, 3, 32, 32)
    assert d.x_train.dtype == d.x_val.dtype == d.x_test.dtype == torch.float32
    assert d.y_train.dtype == d.y_val.dtype == d.y_test.dtype == torch.int64
    # the fixture's labels cycle from the batch index: batches in order, test batch last
    labels = [(i + j) % 10 for i in range(5) for j in range(N)]
    assert sorted(d.y_train.tolist() + d.y_val.tolist()) == sorted(labels)
    # classes 2, 3 and 4 (3 images each) have the largest remainders; ties go to the smaller
    assert d.y_val.tolist() == [2, 3]
    assert d.y_test.tolist() == [(5 + j) % 10 for j in range(N)]


def test_validation_is_carved_from_the_training_batches(tmp_path):
    """500 of each class's 5000 in the real data; here 1 of each class's 10. Train and
    validation partition the training batches' images, the test batch is untouched, and the
    carve does not depend on the global RNG."""
    folder = write_cifar10_fixture(tmp_path, n_per_batch=20, seed=2)
    torch.manual_seed(0)
    d = load_cifar10(folder, normalize=False)
    torch.manual_seed(1)
    again = load_cifar10(folder, normalize=False)
    assert torch.equal(d.x_val, again.x_val) and torch.equal(d.y_train, again.y_train)
    assert torch.bincount(d.y_val, minlength=10).tolist() == [1] * 10
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (90, 10, 20)
    whole = np.concatenate([pickle.loads((folder / f).read_bytes())[b"data"]
                            for f in TRAIN_FILES])
    rows = {bytes(r) for r in whole}
    train = {bytes((x * 255).round().to(torch.uint8).flatten()) for x in d.x_train}
    val = {bytes((x * 255).round().to(torch.uint8).flatten()) for x in d.x_val}
    assert not train & val and train | val == rows
    test = pickle.loads((folder / TEST_FILE).read_bytes())[b"data"]
    assert torch.equal((d.x_test * 255).round().to(torch.uint8).flatten(1),
                       torch.from_numpy(test))
    other = load_cifar10(folder, normalize=False, split_seed=1)
    assert not torch.equal(other.x_val, d.x_val) and torch.equal(other.x_test, d.x_test)


def test_pixel_layout_and_normalisation(tmp_path):
    """Row-major R, G, B planes: byte c*1024 + r*32 + col is channel c at (r, col)."""
    write_cifar10_fixture(tmp_path, n_per_batch=2)
    data = np.zeros((2, 3072), np.uint8)
    data[1, 0 * 1024 + 5 * 32 + 7] = 255  # red at row 5, column 7
    data[1, 1 * 1024 + 0 * 32 + 31] = 51  # green at row 0, column 31
    data[1, 2 * 1024 + 31 * 32 + 0] = 102  # blue at row 31, column 0
    _dump(tmp_path / TEST_FILE, {b"data": data, b"labels": [4, 9]})

    raw = load_cifar10(tmp_path, normalize=False).x_test
    assert raw[1, 0, 5, 7] == 1.0 and raw[1, 1, 0, 31] == pytest.approx(0.2)
    assert raw[1, 2, 31, 0] == pytest.approx(0.4)
    assert raw.count_nonzero() == 3 and raw.min() >= 0.0 and raw.max() <= 1.0

    x = load_cifar10(tmp_path).x_test
    expected = {(0, 5, 7): 1.0, (1, 0, 31): 0.2, (2, 31, 0): 0.4, (0, 0, 0): 0.0, (2, 1, 1): 0.0}
    for (c, r, col), p in expected.items():
        assert x[1, c, r, col].item() == pytest.approx((p - MEAN[c]) / STD[c], rel=1e-6)
    assert x[1, 0, 5, 7].item() == pytest.approx((1.0 - 0.4914) / 0.2470, rel=1e-6)


def test_real_scale_statistics_are_near_standard(tmp_path):
    """Uniform random pixels: per-channel mean (127.5/255 - m)/s and std (~0.2887)/s."""
    d = load_cifar10(write_cifar10_fixture(tmp_path, n_per_batch=20, seed=1))
    x = d.x_train.transpose(0, 1).reshape(3, -1)
    for c in range(3):
        assert x[c].mean().item() == pytest.approx((0.5 - MEAN[c]) / STD[c], abs=0.02)
        assert x[c].std().item() == pytest.approx(0.2887 / STD[c], rel=0.02)


def test_nested_layout_matches_flat(tmp_path, flat):
    nested = write_cifar10_fixture(tmp_path / "root" / SUBDIR, n_per_batch=N)
    a, b = load_cifar10(flat), load_cifar10(nested.parent)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_chimera_data_env(monkeypatch, tmp_path, flat):
    write_cifar10_fixture(tmp_path / "env" / SUBDIR, n_per_batch=N, seed=5)
    monkeypatch.setenv("CHIMERA_DATA", str(tmp_path / "env"))
    from_env = load_task("cifar10")
    assert from_env.x_train.shape == (5 * N - 2, 3, 32, 32)
    # an explicit data_dir wins over the environment
    assert not torch.equal(load_cifar10(flat).x_train, from_env.x_train)


@pytest.mark.parametrize("value", [None, ""])
def test_no_directory_and_no_env(monkeypatch, value):
    if value is not None:
        monkeypatch.setenv("CHIMERA_DATA", value)
    with pytest.raises(ValueError, match=r"data_dir or set the CHIMERA_DATA.*CIFAR-10 python"):
        load_cifar10()


def test_missing_directory(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=rf"{_q(missing)} \(from data_dir\) does not exist"):
        load_cifar10(missing)
    monkeypatch.setenv("CHIMERA_DATA", str(missing))
    with pytest.raises(ValueError, match=r"nowhere' \(from CHIMERA_DATA\) does not exist"):
        load_cifar10()


@pytest.mark.parametrize("name", [TRAIN_FILES[2], TEST_FILE])
def test_missing_batch(tmp_path, name):
    folder = write_cifar10_fixture(tmp_path / SUBDIR, n_per_batch=1)
    (folder / name).unlink()
    with pytest.raises(ValueError, match=rf"'{name}' not found in {_q(folder)}"):
        load_cifar10(tmp_path)


def test_truncated_batch(flat):
    path = flat / TRAIN_FILES[0]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{_q(path)} is truncated or corrupt"):
        load_cifar10(flat)


def test_garbage_batch(flat):
    (flat / TEST_FILE).write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"test_batch' is truncated or corrupt"):
        load_cifar10(flat)


_DATA = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([1, 2], r"expected a dict with keys b'data' and b'labels', found a list$"),
        ({}, r"found no keys$"),
        ({"data": _DATA, "labels": [0, 1]}, r"found 'data', 'labels'$"),
        ({b"data": _DATA}, r"found b'data'$"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"\(n, 3072\).*\(2, 3000\)"),
        ({b"data": _DATA.astype(np.float32), b"labels": [0, 1]}, r"uint8.*got float32"),
        ({b"data": _DATA, b"labels": [0, 1, 2]}, r"must be 2 integers.*\(3,\)"),
        ({b"data": _DATA, b"labels": [0.5, 1.0]}, r"must be 2 integers, got float64"),
        ({b"data": _DATA, b"labels": [3, 10]}, r"labels must lie in 0..9, found 3..10"),
        ({b"data": _DATA, b"labels": [-1, 2]}, r"found -1..2"),
    ],
)
def test_wrong_format(flat, batch, message):
    path = flat / TRAIN_FILES[4]
    _dump(path, batch)
    with pytest.raises(ValueError, match=rf"{_q(path)} has the wrong format: .*{message}"):
        load_cifar10(flat)


def test_fixture_rejects_empty_batches(tmp_path):
    with pytest.raises(ValueError, match="n_per_batch"):
        write_cifar10_fixture(tmp_path, n_per_batch=0)
