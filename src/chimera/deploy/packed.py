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

These are the float ops of the source layer's forward on the same values (``T * s`` with ``T`` in
{-1, 0, 1} is exact), so the outputs equal the source layer's eval outputs bit for bit.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera._validate import choice, integer, number, optional_integer, optional_number
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
from chimera.quant.functions import ACT_QUANT_MODES, quantize_activations

# integer-ternary layers quantize activations with quantize_activations' default eps_beta
_DEFAULT_EPS_BETA = inspect.signature(quantize_activations).parameters["eps_beta"].default


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
    ) -> None:
        super().__init__()
        self.act_quant = choice("act_quant", act_quant, ACT_QUANT_MODES)
        self.group_size = optional_integer("group_size", group_size, 1)
        self.eps_beta = number("eps_beta", eps_beta, 0, low_open=True)
        self.clip = optional_number("clip", clip, 0, low_open=True)
        out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
        scale_shape = () if group_size is None else (out, -(-fan_in // group_size))
        self.register_buffer("T", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(scale_shape))
        self.register_buffer("bias", torch.zeros(out) if bias else None)

    # -- construction -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able): ``type(self)(**layer.config())`` rebuilds the
        layer up to its buffers."""
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

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``op(x_q, W, bias)``; an empty batch skips the quantizer (nothing to quantize)."""
        x_q = quantize_activations(x, self.act_quant, self.eps_beta) if x.numel() else x
        return self._project(x_q, self.weight().to(x.dtype), self.bias)

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
