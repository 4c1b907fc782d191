"""Inference layers for exported ternary weights (docs/algorithms.md#packing-and-export):
``PackedTernaryLinear/Conv1d/Conv2d``.

A layer holds the int8 ternary weight ``T``, its float32 ``scale`` and the ``bias``, and computes

    y = op(quantize_activations(x, act_quant, eps_beta), W, bias),   W = clip(T) * scale

with ``op`` = ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` and ``clip(T) = clamp(T, -clip, clip)``
(only when ``clip`` is set). ``scale`` is either

* one value ``gamma = max(scale_ema, eps_gamma)`` (from a Bit layer, ``clip = ste_clip``), or
* one value ``S`` per group of ``group_size`` consecutive weights along the flattened fan-in of
  each output row (from an integer-ternary layer, ``S = group_scale()``; the last group of a row
  may be partial).

Two ways to compute it, chosen per forward:

* **float** (``exact=True``, and wherever the integer kernel does not apply): the float ops of
  the source layer's forward on the same values (``T * s`` with ``T`` in {-1, 0, 1} is exact), so
  the outputs equal the source layer's eval outputs bit for bit. ``W`` is built once per weight
  version and dtype and reused (4 bytes per weight besides ``T``); it is rebuilt when ``T``,
  ``scale`` or ``clip`` change (in place, ``load_state_dict``, ``.to``, a new buffer).
* **integer** (default for ``PackedTernaryLinear`` on CPU with float32 input, ``act_quant`` not
  ``none``, one ``scale``, no gradient asked for and finite input): with ``x_q`` int8 and
  ``beta`` as ``quantize_activations`` computes them,
  ``y = ((x_q @ T^T) * s) * beta + bias``, ``s = clip(1) * scale``, where ``x_q @ T^T`` is an
  exact int8 x int8 -> int32 product (``INTEGER_KERNEL``: oneDNN's int8 matmul on a copy of ``T``
  prepacked once per weight version, 2 bytes per weight in all, or ``torch._int_mm`` on ``T``
  itself, 1 byte per weight). The integer sum is exact, so ``y`` is within 4 roundings of the
  formula's exact value; the float path adds the rounding of its ``fan_in``-term float sum, so
  the two differ by at most ``(fan_in + 3) * u * (sum_k |beta x_q[k] W[n, k]| + |bias[n]|)``
  per output (``u = INTEGER_TOLERANCE = 2^-24``), in practice a few units in the last place.

Per-group scales and convolutions always take the float path (the integer kernel needs one scale
per output row and a 2-D matmul), and so do traces (``torch.compile``, ``torch.export``, ONNX).
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera._validate import (
    choice,
    integer,
    number,
    optional_integer,
    optional_number,
    require,
)
from chimera.nn.bit_layers import (
    WEIGHT_QUANTIZERS,
    BitConv1d,
    BitConv2d,
    BitLayer,
    BitLinear,
    ConvGeometry,
)
from chimera.nn.int_ternary import (
    IntTernaryConv1d,
    IntTernaryConv2d,
    IntTernaryLinear,
    IntTernaryModule,
)
from chimera.quant.functions import ACT_QUANT_MODES, activation_scale, quantize_activations

# integer-ternary layers quantize activations with quantize_activations' default eps_beta
_DEFAULT_EPS_BETA = inspect.signature(quantize_activations).parameters["eps_beta"].default
INTEGER_TOLERANCE = 2.0**-24
"""Unit roundoff ``u`` of the float32 bound between the integer and float paths (module
docstring): ``|y_int - y_float| <= (fan_in + 3) * u * (sum_k |x_q W| + |bias|)``."""


_ROUNDER = 1.5 * 2.0**23  # float32: (v + R) - R rounds v half to even for |v| < 2^22


def round_float32(v: Tensor) -> Tensor:
    """``torch.round(v)`` (half to even; a zero may lose its sign) of a float32 tensor with
    ``|v| < 2^22``, in place, by two additions: with 2 threads on a busy machine
    ``torch.round`` of a few thousand values can take milliseconds (it waits for a second
    thread), an addition does not."""
    return v.add_(_ROUNDER).sub_(_ROUNDER)


def int8_activations(x: Tensor, mode: str, eps_beta: float, *, unsigned: bool = False
                     ) -> tuple[Tensor, Tensor]:
    """``(x_q, beta)`` with ``x_q`` int8 and ``beta * x_q`` the value of
    ``quantize_activations(x, mode, eps_beta)`` (``mode`` per_tensor or per_token); ``x``
    float32 (``|x / beta| <= 127``, so ``round_float32`` applies). ``unsigned``: ``x_q + 128``
    as uint8 instead."""
    x = x.detach()
    beta = activation_scale(x, mode, eps_beta)
    x_q = round_float32(x / beta).clamp_(-127, 127)
    return (x_q.add_(128).to(torch.uint8) if unsigned else x_q.to(torch.int8)), beta


def _onednn_usable() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and callable(
            torch.ops.onednn.qlinear_prepack)
    except (AttributeError, RuntimeError):
        return False


INTEGER_KERNEL = "onednn" if _onednn_usable() else "int_mm"
"""The integer path's kernel: ``onednn`` (``onednn::qlinear_pointwise`` on a copy of ``T``
prepacked once per weight version: 1 more byte per weight, ~1.4x faster than ``int_mm`` at
batch 1 to 16) where torch has it, else ``int_mm`` (``torch._int_mm`` on ``T`` itself)."""


def _version(t: Tensor) -> int | None:
    """``t``'s in-place version counter (None for inference tensors, which keep none)."""
    return None if t.is_inference() else t._version


class PackedTernaryModule(nn.Module):
    """Shared inference logic; subclasses set ``KIND``, ``SOURCES``, ``GEOMETRY`` and
    ``_project``."""

    KIND: str
    SOURCES: tuple[type[nn.Module], ...]  # the training layers this layer replaces
    GEOMETRY: tuple[str, ...]  # constructor arguments read from the source layer

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        *,
        group_size: int | None = None,
        act_quant: str = "per_tensor",
        eps_beta: float = _DEFAULT_EPS_BETA,
        clip: float | None = None,
        exact: bool = False,
    ) -> None:
        super().__init__()
        self.exact = exact
        self.act_quant = choice("act_quant", act_quant, ACT_QUANT_MODES)
        self.group_size = optional_integer("group_size", group_size, 1)
        self.eps_beta = number("eps_beta", eps_beta, 0, low_open=True)
        self.clip = optional_number("clip", clip, 0, low_open=True)
        out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
        scale_shape = () if group_size is None else (out, -(-fan_in // group_size))
        self.register_buffer("T", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(scale_shape))
        self.register_buffer("bias", torch.zeros(out) if bias else None)
        self._caches: dict[str, tuple[Any, ...]] = {}  # name -> (T, scale weakrefs, key, value)

    @property
    def exact(self) -> bool:
        """True: always the float path (outputs equal the source layer's bit for bit); False
        (default): the integer kernel where it applies (module docstring)."""
        return self._exact

    @exact.setter
    def exact(self, value: bool) -> None:
        require(isinstance(value, bool), "exact", value, "True or False")
        self._exact = value

    # -- construction -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor arguments stored in export files (JSON-able):
        ``type(self)(**layer.config())`` rebuilds the layer up to its buffers and ``exact``
        (a runtime choice, not part of the file)."""
        quant = {"group_size": self.group_size, "act_quant": self.act_quant,
                 "eps_beta": self.eps_beta, "clip": self.clip}
        return {**{n: getattr(self, n) for n in self.GEOMETRY}, "bias": self.bias is not None,
                **quant}

    @staticmethod
    def from_module(layer: nn.Module) -> PackedTernaryModule:
        """The inference twin of a Bit layer or integer-ternary layer (buffers detached copies).

        Bit layer: ``T = quantize(W, gamma, current_alpha())`` and ``scale = gamma`` as its
        eval forward computes them; integer-ternary layer: ``T`` and ``scale = group_scale()``.
        """
        cls = next((c for c in PACKED_LAYERS.values() if type(layer) in c.SOURCES), None)
        if cls is None:
            raise TypeError(f"cannot pack {type(layer).__name__}; expected one of "
                            f"{[s.__name__ for c in PACKED_LAYERS.values() for s in c.SOURCES]}")
        geometry = {n: getattr(layer, n) for n in cls.GEOMETRY}
        with torch.no_grad():
            if isinstance(layer, BitLayer):
                gamma = layer.scale_ema.clamp(min=layer.eps_gamma)
                t = WEIGHT_QUANTIZERS[layer.quant_mode](layer.weight_master, gamma,
                                                        layer.current_alpha())
                quant = {"act_quant": layer.act_quant, "eps_beta": layer.eps_beta,
                         "clip": layer.ste_clip}
                scale = gamma
            else:
                t, scale = layer.T, layer.group_scale()
                quant = {"act_quant": layer.act_quant, "group_size": layer.group_size}
            packed = cls(**geometry, bias=layer.bias is not None, **quant)
            packed.T.copy_(t)
            packed.scale.copy_(scale)
            if layer.bias is not None:
                packed.bias.copy_(layer.bias)
        return packed.to(next(layer.buffers()).device)

    # -- forward ----------------------------------------------------------------------------
    def weight(self) -> Tensor:
        """``W = clip(T) * scale`` (per-group scales broadcast over their weights), float32."""
        w = self.T.float()
        if self.clip is not None:
            w = w.clamp(-self.clip, self.clip)
        if self.group_size is None:
            return self.scale * w
        rows = w.shape[0]
        fan_in = w[0].numel()
        s = self.scale.repeat_interleave(self.group_size, dim=1)[:, :fan_in]
        return (w.reshape(rows, fan_in) * s).reshape(w.shape)

    def cached(self, name: str, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """``build()`` (under no_grad), kept under ``name`` and reused while ``T`` and ``scale``
        are the same tensors at the same in-place versions and ``key`` (with ``clip`` and
        ``group_size``) is unchanged; rebuilt otherwise, and on every call for inference-mode
        buffers (which keep no version)."""
        versions = (_version(self.T), _version(self.scale))
        if None in versions:
            with torch.no_grad():
                return build()
        key = (*versions, self.clip, self.group_size, *key)
        entry = self._caches.get(name)
        if entry is None or entry[0]() is not self.T or entry[1]() is not self.scale \
                or entry[2] != key:
            self._caches.pop(name, None)  # free the old value before building the new one
            with torch.no_grad():
                entry = (weakref.ref(self.T), weakref.ref(self.scale), key, build())
            self._caches[name] = entry
        return entry[3]

    def cached_weight(self, dtype: torch.dtype) -> Tensor:
        """``weight().to(dtype)``, built once per version of the buffers (``cached``)."""
        if torch.compiler.is_compiling():
            return self.weight().to(dtype)
        return self.cached("float", (dtype, torch.is_inference_mode_enabled()),
                           lambda: self.weight().to(dtype))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> PackedTernaryModule:
        self._caches = {}  # buffers move or change dtype: rebuilt on the next forward
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_caches": {}}  # pickle/deepcopy: rebuilt

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _integer_forward(self, x: Tensor) -> Tensor | None:
        """The integer path's output, or None where it does not apply (float path)."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        """``op(x_q, W, bias)`` by the integer path where it applies, else the float path; an
        empty batch skips the quantizer (nothing to quantize)."""
        if not self.exact and x.numel():
            y = self._integer_forward(x)
            if y is not None:
                return y
        x_q = quantize_activations(x, self.act_quant, self.eps_beta) if x.numel() else x
        return self._project(x_q, self.cached_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())


class PackedTernaryLinear(PackedTernaryModule):
    """Inference ``BitLinear`` / ``IntTernaryLinear``: ``y = x_q @ W^T + bias``."""

    KIND = "linear"
    SOURCES = (BitLinear, IntTernaryLinear)
    GEOMETRY = ("in_features", "out_features")

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 **quant: Any) -> None:
        self.in_features = integer("in_features", in_features, 1)
        self.out_features = integer("out_features", out_features, 1)
        super().__init__((out_features, in_features), bias, **quant)

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def integer_kernel_applies(self, x: Tensor) -> bool:
        """Whether a forward on ``x`` may take the integer path (module docstring; a
        non-finite input still falls back to the float path)."""
        return (not self.exact and x.device.type == "cpu" and x.dtype == torch.float32
                and self.scale.dtype == torch.float32 and self.group_size is None
                and self.act_quant != "none" and x.numel() > 0
                and 127 * self.in_features < 2**31  # the int32 sum cannot overflow
                and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling())  # traces (compile, export): float ops

    def _integer_forward(self, x: Tensor) -> Tensor | None:
        if not self.integer_kernel_applies(x):
            return None
        onednn = INTEGER_KERNEL == "onednn"
        x_q, beta = int8_activations(x, self.act_quant, self.eps_beta, unsigned=onednn)
        if not bool(torch.isfinite(beta).all()):  # inf/NaN input: the float path's values
            return None
        x_q = x_q.reshape(-1, self.in_features)
        if onednn:
            packed, scales, zeros = self.cached("onednn", (), self._onednn_weight)
            y = torch.ops.onednn.qlinear_pointwise(x_q, 1.0, 128, packed, scales, zeros, None,
                                                   1.0, 0, x.dtype, "none", [], "")
        else:  # y^T = T @ x_q^T: oneDNN's int8 kernel runs this form ~1.5x faster
            acc = torch._int_mm(self.T, x_q.t().contiguous()).t()
            y = acc.to(x.dtype, memory_format=torch.contiguous_format).mul_(self._unit_scale())
        y.mul_(beta.reshape(-1, 1))
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _unit_scale(self) -> Tensor:
        """``s = clip(1) * scale``: ``clip(T) * scale = T * s`` for ``T`` in {-1, 0, 1}."""
        unit = torch.ones((), device=self.scale.device)
        if self.clip is not None:
            unit = unit.clamp(-self.clip, self.clip)
        return self.scale * unit

    def _onednn_weight(self) -> tuple[Tensor, Tensor, Tensor]:
        """``T`` in oneDNN's blocked int8 layout (1 byte per weight), ``s`` per output row and
        zero weight zero-points: the operands of ``onednn::qlinear_pointwise``."""
        rows = self.out_features
        return (torch.ops.onednn.qlinear_prepack(self.T, None),
                self._unit_scale().expand(rows).contiguous(),
                torch.zeros(rows, dtype=torch.int64, device=self.T.device))


class _PackedTernaryConvNd(ConvGeometry, PackedTernaryModule):
    """Inference convolution (zero padding); ``_DIMS`` and ``_CONV`` set the geometry. Besides
    the geometry it takes the keyword arguments of :class:`PackedTernaryModule`."""

    extra_repr = PackedTernaryModule.extra_repr  # the config, geometry included


class PackedTernaryConv1d(_PackedTernaryConvNd):
    """Inference ``BitConv1d`` / ``IntTernaryConv1d``."""

    KIND, SOURCES, _DIMS, _CONV = "conv1d", (BitConv1d, IntTernaryConv1d), 1, F.conv1d


class PackedTernaryConv2d(_PackedTernaryConvNd):
    """Inference ``BitConv2d`` / ``IntTernaryConv2d``."""

    KIND, SOURCES, _DIMS, _CONV = "conv2d", (BitConv2d, IntTernaryConv2d), 2, F.conv2d


PACKED_LAYERS: dict[str, type[PackedTernaryModule]] = {
    c.KIND: c for c in (PackedTernaryLinear, PackedTernaryConv1d, PackedTernaryConv2d)
}
TERNARY_LAYER_TYPES: tuple[type[nn.Module], ...] = (BitLayer, IntTernaryModule)
