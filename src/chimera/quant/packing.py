"""Byte packing of ternary weights (docs/algorithms.md#packing-and-export).

Every weight ``t`` in {-1, 0, 1} becomes the digit ``d = t mod 3`` (0 -> 0, +1 -> 1, -1 -> 2).
A byte holds ``k`` digits in radix ``r`` (little-endian, weight ``i`` of a group is digit ``i``):
``byte = sum_i d_i * r^i``.

* ``2bit``: r = 4, k = 4 (2 bits/weight); a code of 3 is invalid.
* ``base3``: r = 3, k = 5 (1.6 bits/weight, max byte 3^5 - 1 = 242); log2(3) = 1.585 is the limit.

The flattened weights (row-major) are zero-padded to a multiple of ``k``; the padding digits are 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from chimera._validate import choice, int_tuple


class _Format(NamedTuple):
    radix: int
    per_byte: int
    code: int  # stable identifier stored in export files


_FORMATS = {
    "2bit": _Format(radix=4, per_byte=4, code=0),
    "base3": _Format(radix=3, per_byte=5, code=1),
}
FORMATS = tuple(_FORMATS)


def _format_spec(format: str) -> _Format:
    return _FORMATS[choice("format", format, FORMATS)]


def _powers(spec: _Format, device: torch.device) -> Tensor:
    """``r^i`` for i = 0..k-1 as uint8 (at most 4^3 = 64)."""
    return spec.radix ** torch.arange(spec.per_byte, dtype=torch.uint8, device=device)


@dataclass(frozen=True)
class PackedTernary:
    """Packed ternary tensor: ``data`` (uint8, 1-D) holds ``numel = prod(shape)`` weights.

    Construction checks the structure (format, shape, dtype and length of ``data``);
    ``unpack_ternary`` checks the byte values.
    """

    data: Tensor
    shape: tuple[int, ...]
    format: str
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        spec = _format_spec(self.format)
        shape = int_tuple("shape", self.shape, 0)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "numel", math.prod(shape))
        data = self.data
        if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.ndim != 1:
            raise ValueError("data must be a 1-D torch.uint8 tensor")
        expected = -(-self.numel // spec.per_byte)
        if data.numel() != expected:
            raise ValueError(
                f"data has {data.numel()} bytes but shape {shape} in format {self.format!r} "
                f"needs {expected} ({spec.per_byte} weights per byte)"
            )

    @property
    def bits_per_weight(self) -> float:
        """``8 * len(data) / numel`` (0.0 for an empty tensor)."""
        return 8 * self.data.numel() / self.numel if self.numel else 0.0


def _check_ternary(T: object) -> Tensor:
    """``T`` as int8 after checking it is an int/float tensor holding only -1, 0, 1."""
    if not isinstance(T, Tensor):
        raise TypeError(f"T must be a torch.Tensor, got {type(T).__name__}")
    if T.dtype == torch.bool or T.is_complex():
        raise TypeError(f"T must have an integer or floating-point dtype, got {T.dtype}")
    t8 = T.to(torch.int8)
    bad = (t8 != T) | (t8.abs() > 1)  # catches fractions, NaN, inf and int8 wrap-around
    if bad.any():
        found = T[bad].unique()[:5].tolist()
        raise ValueError(f"T must hold only the values -1, 0, 1; found e.g. {found}")
    return t8


def pack_ternary(T: Tensor, format: str = "base3") -> PackedTernary:
    """Pack a ternary tensor: ``byte_j = sum_i d_{kj+i} * r^i`` with ``d = T mod 3``."""
    spec = _format_spec(format)
    t8 = _check_ternary(T)
    digits = torch.remainder(t8.reshape(-1), 3).to(torch.uint8)
    pad = -digits.numel() % spec.per_byte
    digits = torch.cat([digits, digits.new_zeros(pad)]).view(-1, spec.per_byte)
    data = (digits * _powers(spec, digits.device)).sum(dim=1, dtype=torch.uint8)
    return PackedTernary(data=data, shape=tuple(T.shape), format=format)


def unpack_ternary(packed: PackedTernary) -> Tensor:
    """Inverse of ``pack_ternary``: int8 tensor of ``packed.shape`` on the device of ``data``.

    Raises ValueError on corrupt data: a base3 byte > 242, a 2bit code of 3, or nonzero padding.
    """
    if not isinstance(packed, PackedTernary):
        raise TypeError(f"packed must be a PackedTernary, got {type(packed).__name__}")
    spec = _format_spec(packed.format)
    data = packed.data
    max_byte = spec.radix**spec.per_byte - 1
    if max_byte < 255 and (data > max_byte).any():
        raise ValueError(f"corrupt {packed.format} data: byte value > {max_byte}")
    digits = (data.unsqueeze(1) // _powers(spec, data.device) % spec.radix).reshape(-1)
    if (digits > 2).any():
        raise ValueError(f"corrupt {packed.format} data: code 3 (only codes 0, 1, 2 are valid)")
    if digits[packed.numel :].any():
        raise ValueError(f"corrupt {packed.format} data: nonzero padding after the last weight")
    digits = digits[: packed.numel].to(torch.int8)
    return torch.where(digits == 2, -1, digits).reshape(packed.shape)


def packed_to_tensors(p: PackedTernary, prefix: str) -> dict[str, Tensor]:
    """Plain tensors for a safetensors file: ``{prefix}.data`` (uint8), ``{prefix}.shape``
    (int64, 1-D) and ``{prefix}.format`` (uint8 code, one element)."""
    return {
        f"{prefix}.data": p.data,
        f"{prefix}.shape": torch.tensor(p.shape, dtype=torch.int64),
        f"{prefix}.format": torch.tensor([_FORMATS[p.format].code], dtype=torch.uint8),
    }


def packed_from_tensors(tensors: dict[str, Tensor], prefix: str) -> PackedTernary:
    """Inverse of ``packed_to_tensors``; ValueError on missing keys or malformed entries."""
    keys = [f"{prefix}.{name}" for name in ("data", "shape", "format")]
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"tensors is missing the keys {missing}")
    data, shape, code = (tensors[k] for k in keys)
    if shape.dtype != torch.int64 or shape.ndim != 1:
        got = f"{shape.dtype} of shape {tuple(shape.shape)}"
        raise ValueError(f"{keys[1]} must be a 1-D int64 tensor, got {got}")
    names = {f.code: name for name, f in _FORMATS.items()}
    if code.dtype != torch.uint8 or code.numel() != 1 or int(code) not in names:
        raise ValueError(f"{keys[2]} must be one uint8 code in {names}, got {code.tolist()}")
    return PackedTernary(data=data, shape=tuple(shape.tolist()), format=names[int(code)])
