import random

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from chimera.data import TASKS, TaskData, load_task
from chimera.data import mnist1d as m1d
from chimera.data.tasks import carve_validation, validation_indices


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A private, empty disk cache and an empty in-process cache (cleared again afterwards)."""
    monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path))
    m1d._arrays.cache_clear()
    yield tmp_path
    m1d._arrays.cache_clear()


def _check_split(d: TaskData, sizes: tuple[int, int, int], shape: tuple[int, ...]) -> None:
    """Split sizes (train, val, test), dtypes, shapes, and every class in every split."""
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        x, y = getattr(d, f"x_{split}"), getattr(d, f"y_{split}")
        assert (x.shape, y.shape) == ((n, *shape), (n,)), split
        assert (x.dtype, y.dtype) == (torch.float32, torch.int64)
        assert set(y.tolist()) == set(range(10))
    assert d.input_shape == shape and d.num_classes == 10


def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, x.flatten(1).tolist()))


def _assert_stratified(d: TaskData) -> None:
    """Each class's share of the validation split is its share of train + val, within one
    example."""
    n_val = len(d.y_val)
    counts_val = torch.bincount(d.y_val, minlength=d.num_classes)
    counts_all = counts_val + torch.bincount(d.y_train, minlength=d.num_classes)
    expected = n_val * counts_all / counts_all.sum()
    assert (counts_val - expected).abs().max() < 1


def test_registry_names_and_unknown_task():
    assert {"digits", "mnist1d"} <= set(TASKS.names())
    with pytest.raises(ValueError, match="unknown task 'nope'.*digits"):
        load_task("nope")


def test_digits_split_is_stratified_scaled_and_deterministic():
    d = load_task("digits")
    _check_split(d, (1293, 144, 360), (64,))
    assert d.name == "digits"
    assert d.x_train.min() >= 0.0 and d.x_train.max() == 1.0  # pixels / 16
    # stratified: each class's share of the test set matches its share of the whole set
    counts_test = torch.bincount(d.y_test, minlength=10).float()
    counts_all = counts_test + torch.bincount(torch.cat([d.y_train, d.y_val]), minlength=10)
    assert torch.allclose(counts_test / counts_all, torch.full((10,), 0.2), atol=0.01)
    again = load_task("digits")
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    other = load_task("digits", split_seed=1)
    assert not torch.equal(d.y_test, other.y_test)


def test_digits_test_fraction():
    d = load_task("digits", test_fraction=0.5)
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    assert abs(len(d.y_test) - 898.5) <= 1 and len(d.y_val) == 90  # 10% of the 898 left


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
    _check_split(d, (3600, 400, 1000), (40,))
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
        (d.x_val, again.x_val),
        (d.y_val, again.y_val),
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
    assert calls == [7] and d.x_train.shape == (7, 40) and d.x_val.shape == (1, 40)
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
            assert load_task("mnist1d", seed=5).y_train.shape == (7,)
    finally:
        m1d._arrays.cache_clear()


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("CHIMERA_CACHE", raising=False)
    assert m1d.cache_dir().parts[-2:] == (".cache", "chimera")
    monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path))
    assert m1d.cache_dir() == tmp_path


# ---- validation splits -----------------------------------------------------------------------

@pytest.mark.parametrize(("name", "sizes", "shape"), [
    ("digits", (1293, 144, 360), (64,)),
    ("digits_2d", (1293, 144, 360), (1, 8, 8)),
    ("synthetic_images", (461, 51, 128), (3, 32, 32)),
])
def test_every_task_has_a_documented_stratified_validation_split(name, sizes, shape):
    d = load_task(name)
    if name == "synthetic_images":  # random labels: sizes only, no class is guaranteed
        assert (len(d.y_train), len(d.y_val), len(d.y_test)) == sizes
        assert d.input_shape == shape
    else:
        _check_split(d, sizes, shape)
    _assert_stratified(d)


def test_the_carve_ignores_the_global_rng_and_is_seeded_by_split_seed_only():
    torch.manual_seed(1)
    a = load_task("digits")
    torch.manual_seed(2)
    torch.rand(5)
    b = load_task("digits")
    for split in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, split), getattr(b, split)), split
    other = load_task("synthetic_images", split_seed=1)
    same = load_task("synthetic_images")
    assert torch.equal(other.x_test, same.x_test) and not torch.equal(other.x_val, same.x_val)


def test_digits_train_and_val_partition_the_sklearn_training_split():
    x, y = load_digits(return_X_y=True)
    x_tr, _, _, _ = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    d = load_task("digits")
    assert _rows(torch.cat([d.x_train, d.x_val])) == _rows(torch.tensor(x_tr, dtype=torch.float32))


def test_mnist1d_validation_is_carved_from_train_and_test_is_unchanged(fresh_cache, monkeypatch):
    def arrays(seed):  # distinct rows: row i is the constant i
        return {"x": np.repeat(np.arange(40.0), 40).reshape(40, 40), "y": np.arange(40) % 10,
                "x_test": np.full((5, 40), -1.0), "y_test": np.arange(5)}

    monkeypatch.setattr(m1d, "_generate", arrays)
    d = load_task("mnist1d")
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (36, 4, 5)
    train, val = set(d.x_train[:, 0].tolist()), set(d.x_val[:, 0].tolist())
    assert not train & val and train | val == set(map(float, range(40)))
    # 4 examples per class, 4 to hold out: equal remainders, so labels 0..3 get one each
    assert sorted(d.y_val.tolist()) == [0, 1, 2, 3]
    assert d.y_val.tolist() == [int(v) % 10 for v in d.x_val[:, 0].tolist()]
    assert torch.equal(d.x_test, torch.full((5, 40), -1.0))
    assert torch.equal(d.x_train[:, 0], torch.sort(d.x_train[:, 0]).values)  # order kept
    moved = load_task("mnist1d", split_seed=3)
    assert torch.equal(moved.x_test, d.x_test) and not torch.equal(moved.x_val, d.x_val)


def test_validation_indices_partition_stratify_and_sort():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100)]
    train, val = validation_indices(labels, 0.15, split_seed=4)
    assert len(val) == 15 and len(train) == 85
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(100))
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    # quotas 15 * (50, 30, 20) / 100 = (7.5, 4.5, 3): the largest remainders, ties to label 0
    assert torch.bincount(labels[val], minlength=3).tolist() == [8, 4, 3]
    again = validation_indices(labels, 0.15, split_seed=4)
    assert torch.equal(again[1], val)
    assert not torch.equal(validation_indices(labels, 0.15, split_seed=5)[1], val)


@pytest.mark.parametrize(("fraction", "message"), [
    (0.0, r"val_fraction must be a number in \(0, 1\)"),
    (1.0, r"val_fraction must be a number in \(0, 1\)"),
    ("0.1", "val_fraction"),
    (0.0001, "leaving at least one for validation and one for training"),
])
def test_bad_val_fraction_is_rejected(fraction, message):
    with pytest.raises(ValueError, match=message):
        load_task("digits", val_fraction=fraction)


def test_task_data_rejects_an_empty_or_mismatched_split():
    x, y = torch.zeros(4, 2), torch.arange(4)
    with pytest.raises(ValueError, match="the val split must be as many inputs as labels"):
        TaskData("t", x, y, x[:0], y[:0], x, y, 4)
    with pytest.raises(ValueError, match="the test split"):
        TaskData("t", x, y, x, y, x, y[:3], 4)
    d = carve_validation("t", x, y, x, y, 4, val_fraction=0.25)
    assert (len(d.y_train), len(d.y_val)) == (3, 1)
