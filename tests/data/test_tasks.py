import random

import numpy as np
import pytest
import torch

from chimera.data import TASKS, TaskData, load_task
from chimera.data import mnist1d as m1d


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A private, empty disk cache and an empty in-process cache (cleared again afterwards)."""
    monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path))
    m1d._arrays.cache_clear()
    yield tmp_path
    m1d._arrays.cache_clear()


def _check_split(d: TaskData, n_train: int, n_test: int, shape: tuple[int, ...]) -> None:
    assert (d.x_train.shape, d.x_test.shape) == ((n_train, *shape), (n_test, *shape))
    assert d.y_train.shape == (n_train,) and d.y_test.shape == (n_test,)
    assert d.x_train.dtype == d.x_test.dtype == torch.float32
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    assert d.input_shape == shape and d.num_classes == 10
    for y in (d.y_train, d.y_test):
        assert set(y.tolist()) == set(range(10))


def test_registry_names_and_unknown_task():
    assert {"digits", "mnist1d"} <= set(TASKS.names())
    with pytest.raises(ValueError, match="unknown task 'nope'.*digits"):
        load_task("nope")


def test_digits_split_is_stratified_scaled_and_deterministic():
    d = load_task("digits")
    _check_split(d, 1437, 360, (64,))
    assert d.name == "digits"
    assert d.x_train.min() >= 0.0 and d.x_train.max() == 1.0  # pixels / 16
    # stratified: each class's share of the test set matches its share of the whole set
    counts_test = torch.bincount(d.y_test, minlength=10).float()
    counts_all = counts_test + torch.bincount(d.y_train, minlength=10).float()
    assert torch.allclose(counts_test / counts_all, torch.full((10,), 0.2), atol=0.01)
    again = load_task("digits")
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    other = load_task("digits", split_seed=1)
    assert not torch.equal(d.y_test, other.y_test)


def test_digits_test_fraction():
    d = load_task("digits", test_fraction=0.5)
    assert len(d.y_train) + len(d.y_test) == 1797 and abs(len(d.y_test) - 898.5) <= 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_digits_rejects_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_task("digits", test_fraction=fraction)


def test_mnist1d_shapes_determinism_and_disk_cache(fresh_cache, monkeypatch):
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    d = load_task("mnist1d")  # generates, which reseeds the global RNGs internally ...
    assert (random.random(), np.random.rand()) == expected  # ... and must restore them
    _check_split(d, 4000, 1000, (40,))
    assert d.name == "mnist1d"
    assert abs(d.x_train.mean().item()) < 0.05 and abs(d.x_train.std().item() - 1) < 0.05
    assert (fresh_cache / "mnist1d-seed42.npz").is_file()
    assert not list(fresh_cache.glob("*.tmp"))
    # a fresh process state reads the disk cache and must not regenerate
    m1d._arrays.cache_clear()
    monkeypatch.setattr(m1d, "_generate", lambda seed: pytest.fail("regenerated"))
    again = load_task("mnist1d")
    for a, b in [
        (d.x_train, again.x_train),
        (d.y_train, again.y_train),
        (d.x_test, again.x_test),
        (d.y_test, again.y_test),
    ]:
        assert torch.equal(a, b)
    # returned tensors are copies: mutating one cannot corrupt the cache
    again.x_train.zero_()
    assert torch.equal(load_task("mnist1d").x_train, d.x_train)


def _fake_arrays(seed):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(8, 40)),
        "y": np.arange(8) % 10,
        "x_test": rng.normal(size=(2, 40)),
        "y_test": np.arange(2),
    }


@pytest.mark.parametrize("garbage", [b"", b"not an npz file", b"PK\x03\x04truncated"])
def test_mnist1d_corrupt_cache_is_regenerated(fresh_cache, monkeypatch, garbage):
    calls = []
    monkeypatch.setattr(m1d, "_generate", lambda seed: calls.append(seed) or _fake_arrays(seed))
    path = fresh_cache / "mnist1d-seed7.npz"
    path.write_bytes(garbage)
    d = load_task("mnist1d", seed=7)
    assert calls == [7] and d.x_train.shape == (8, 40)
    m1d._arrays.cache_clear()
    assert torch.equal(load_task("mnist1d", seed=7).x_train, d.x_train)
    assert calls == [7]  # the rewritten file was read back


def test_mnist1d_cache_with_missing_key_is_regenerated(fresh_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(m1d, "_generate", lambda seed: calls.append(seed) or _fake_arrays(seed))
    np.savez(fresh_cache / "mnist1d-seed3.npz", x=np.zeros((2, 40)))
    assert load_task("mnist1d", seed=3).x_test.shape == (2, 40) and calls == [3]


def test_mnist1d_unwritable_cache_warns_but_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CHIMERA_CACHE", str(blocker / "sub"))
    monkeypatch.setattr(m1d, "_generate", _fake_arrays)
    m1d._arrays.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not cache"):
            assert load_task("mnist1d", seed=5).y_train.shape == (8,)
    finally:
        m1d._arrays.cache_clear()


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("CHIMERA_CACHE", raising=False)
    assert m1d.cache_dir().parts[-2:] == (".cache", "chimera")
    monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path))
    assert m1d.cache_dir() == tmp_path
