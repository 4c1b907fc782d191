import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chimera.quant.packing import (
    FORMATS,
    PackedTernary,
    pack_ternary,
    packed_from_tensors,
    packed_to_tensors,
    unpack_ternary,
)


def _ternary(shape, seed=0, dtype=torch.int8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(dtype)


@st.composite
def ternary_tensors(draw):
    """Tensors of 0..4 dims, each size 0..40, at most ~4k elements."""
    shape, budget = [], 4096
    for _ in range(draw(st.integers(0, 4))):
        size = draw(st.integers(0, min(40, budget)))
        shape.append(size)
        budget //= max(size, 1)
    dtype = draw(st.sampled_from([torch.int8, torch.float32]))
    return _ternary(shape, draw(st.integers(0, 2**31)), dtype)


@settings(max_examples=150, deadline=None)
@given(T=ternary_tensors(), format=st.sampled_from(FORMATS))
def test_round_trip(T, format):
    p = pack_ternary(T, format)
    per_byte = {"2bit": 4, "base3": 5}[format]
    assert p.shape == tuple(T.shape) and p.numel == T.numel() and p.format == format
    assert p.data.dtype == torch.uint8 and p.data.numel() == math.ceil(T.numel() / per_byte)
    out = unpack_ternary(p)
    assert out.dtype == torch.int8 and out.shape == T.shape
    assert torch.equal(out, T.to(torch.int8))
    assert torch.equal(unpack_ternary(packed_from_tensors(packed_to_tensors(p, "w"), "w")), out)


@pytest.mark.parametrize(("format", "bits"), [("base3", 1.6), ("2bit", 2.0)])
def test_bits_per_weight(format, bits):
    assert pack_ternary(_ternary((5000,)), format).bits_per_weight == bits
    assert pack_ternary(torch.zeros(0, 3), format).bits_per_weight == 0.0


def test_known_bytes():
    T = torch.tensor([1, -1, 0, 1, -1, 1])
    # digits (0, +1, -1 -> 0, 1, 2): 1 2 0 1 2 | 1 (zero padded)
    assert pack_ternary(T, "base3").data.tolist() == [1 + 2 * 3 + 1 * 27 + 2 * 81, 1]  # 196, 1
    assert pack_ternary(T, "2bit").data.tolist() == [1 + 2 * 4 + 1 * 64, 2 + 1 * 4]  # 73, 6
    assert pack_ternary(-torch.ones(5), "base3").data.tolist() == [242]
    assert pack_ternary(torch.tensor(-1.0), "2bit").data.tolist() == [2]


def test_zero_dim_and_empty():
    for T in (torch.tensor(1), torch.zeros(3, 0, 2)):
        p = pack_ternary(T)
        assert torch.equal(unpack_ternary(p), T.to(torch.int8))
    assert pack_ternary(torch.zeros(3, 0, 2)).data.numel() == 0


def test_default_format_is_base3():
    assert pack_ternary(torch.ones(5)).format == "base3"


@pytest.mark.parametrize("format", FORMATS)
def test_large_round_trip(format):
    T = _ternary((1000, 1000), seed=1)
    assert torch.equal(unpack_ternary(pack_ternary(T, format)), T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip():
    T = _ternary((37, 11)).cuda()
    p = pack_ternary(T)
    assert p.data.is_cuda
    assert torch.equal(unpack_ternary(p), T)


def test_safetensors_file_round_trip(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    tensors = {}
    for i, (shape, format) in enumerate([((7, 3), "base3"), ((), "2bit"), ((0,), "base3")]):
        tensors.update(packed_to_tensors(pack_ternary(_ternary(shape, i), format), f"layer{i}"))
    path = tmp_path / "packed.safetensors"
    st_torch.save_file(tensors, path)
    loaded = st_torch.load_file(path)
    for i, (shape, format) in enumerate([((7, 3), "base3"), ((), "2bit"), ((0,), "base3")]):
        p = packed_from_tensors(loaded, f"layer{i}")
        assert p.format == format and p.shape == shape
        assert torch.equal(unpack_ternary(p), _ternary(shape, i))


@pytest.mark.parametrize(
    "T",
    [torch.tensor([0, 2]), torch.tensor([0.5]), torch.tensor([float("nan")]), torch.tensor([257])],
)
def test_pack_rejects_non_ternary_values(T):
    with pytest.raises(ValueError, match="only the values -1, 0, 1"):
        pack_ternary(T)


def test_pack_rejects_bad_types_and_format():
    with pytest.raises(TypeError, match="torch.Tensor"):
        pack_ternary([1, 0, -1])
    with pytest.raises(TypeError, match="integer or floating-point"):
        pack_ternary(torch.tensor([True]))
    with pytest.raises(ValueError, match=r"^format must be one of 2bit, base3, got 'base4'$"):
        pack_ternary(torch.ones(3), "base4")


def test_packed_ternary_checks_structure():
    data = torch.zeros(2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="has 2 bytes .* needs 3"):
        PackedTernary(data, (11,), "2bit")
    with pytest.raises(ValueError, match="1-D torch.uint8"):
        PackedTernary(data.to(torch.int16), (10,), "base3")
    with pytest.raises(ValueError, match=r"shape must be a tuple of integers >= 0, got \(-1, 10\)"):
        PackedTernary(data, (-1, 10), "base3")
    with pytest.raises(ValueError, match="shape must be a tuple of integers >= 0"):
        PackedTernary(data, (True, 10), "base3")  # a bool is not a dimension
    with pytest.raises(ValueError, match="format must be one of"):
        PackedTernary(data, (10,), "1bit")
    p = pack_ternary(torch.ones(10))
    with pytest.raises(ValueError, match="has 1 bytes"):
        dataclasses.replace(p, data=p.data[:1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.format = "2bit"


@pytest.mark.parametrize(
    ("format", "byte", "match"),
    [("base3", 243, "byte value > 242"), ("2bit", 0b11, "code 3"), ("2bit", 0b11000000, "code 3")],
)
def test_unpack_rejects_corrupt_bytes(format, byte, match):
    with pytest.raises(ValueError, match=match):
        unpack_ternary(PackedTernary(torch.tensor([byte], dtype=torch.uint8), (4,), format))


@pytest.mark.parametrize(("format", "numel", "byte"), [("base3", 4, 81), ("2bit", 3, 64)])
def test_unpack_rejects_nonzero_padding(format, numel, byte):
    p = PackedTernary(torch.tensor([byte], dtype=torch.uint8), (numel,), format)
    with pytest.raises(ValueError, match="nonzero padding"):
        unpack_ternary(p)
    with pytest.raises(TypeError, match="PackedTernary"):
        unpack_ternary(p.data)


def test_packed_from_tensors_rejects_malformed_entries():
    good = packed_to_tensors(pack_ternary(torch.ones(2, 3), "2bit"), "w")
    assert good["w.shape"].tolist() == [2, 3] and good["w.format"].tolist() == [0]
    with pytest.raises(ValueError, match=r"missing the keys \['w.format'\]"):
        packed_from_tensors({k: v for k, v in good.items() if k != "w.format"}, "w")
    with pytest.raises(ValueError, match="w.shape must be a 1-D int64"):
        packed_from_tensors({**good, "w.shape": good["w.shape"].float()}, "w")
    with pytest.raises(ValueError, match="w.format must be one uint8 code"):
        packed_from_tensors({**good, "w.format": torch.tensor([7], dtype=torch.uint8)}, "w")
    with pytest.raises(ValueError, match="has 2 bytes .* needs 3"):
        packed_from_tensors({**good, "w.shape": torch.tensor([3, 3])}, "w")
