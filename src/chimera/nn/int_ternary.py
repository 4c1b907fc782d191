"""Integer-ternary layers (docs/algorithms.md#scaledoptum, #integer-ternary-layers): ternary
weights trained with integer state only.

A layer holds no float latent weight. Its weight is the int8 tensor ``T`` in {-1, 0, +1} and,
per group of ``gs`` consecutive weights along the (flattened) input dimension of each output
row, an int8 exponent ``E`` and an int64 correlation accumulator ``corr_accum``. With the int64
counter ``step`` (number of ``update_corr`` calls), the effective weight is ``W = T * S`` with::

    S = 2^E * (1 + corr_accum / (step * gs))        (S = 2^E while step == 0)

Groups: for a weight of shape (out, *fan_in_dims) the fan-in ``in_features`` or
``(in_channels / groups) * prod(kernel_size)`` is split per output row into
``ceil(fan_in / gs)`` groups; when ``gs`` does not divide the fan-in, the last group of each row
is padded with weights that are always 0 (they add nothing to a score; the denominator keeps
``gs`` exactly as in the equation). Buffers ``E`` and ``corr_accum`` have shape (out, groups).

The layer's float ``weight`` (an ``nn.Parameter`` of the weight's shape) is a cache of ``W``,
not training state: the layer rewrites it (``sync_weight``) after every change of ``T``, ``E``,
``corr_accum`` or ``step`` by its own methods, after ``load_float_weight`` and after
``load_state_dict``; code that writes the buffers directly calls ``sync_weight()``. The forward
uses it, so its ``.grad`` is ``dL/dW`` and follows torch's conventions: it accumulates over
backward passes until ``zero_grad`` (micro-batches, ``gradient_accumulation_steps``), DDP
all-reduces it, ``clip_grad_norm_`` and grad-norm logging see it, and
``weight.requires_grad_(False)`` freezes the ternary state. ``state_dict()`` holds it like any
parameter (exporters and checkpoint tools expect every parameter there), but loading ignores its
value and recomputes it from the loaded integer state; a checkpoint without it (saved before the
cache existed) loads too. The cache costs 4 bytes per weight (fp32) in memory and checkpoints,
plus 4 for its gradient; no float optimizer may update it (:class:`chimera.optim.scaled_optum.
ScaledOptum` keeps it in its ternary group, where nothing float touches it).

Training protocol (driven by ``ScaledOptum``; ``g = dL/dW``, non-finite entries read as 0):

1. ``update_corr(g)``: ``descent_sign = -sign(g)`` (int16), per group
   ``score = sum(descent_sign * T)``, ``step += 1``, ``corr_accum += score`` (int64, never
   reset or clipped): the scale grows where descent pushes weights outward;
2. ``update_ternary(increment, threshold)`` (design choice, see ``docs/int_ternary.md``): a
   per-weight int8 ``pressure`` counter accumulates signed integer increments (the optimizer
   derives them from ``g``); where ``|pressure| >= threshold``, ``T`` moves one step toward
   ``sign(pressure)`` (clamped to {-1, 0, +1}) and that counter resets to 0. So
   ``threshold * T + pressure`` is an integer latent weight and ``T`` its quantization with
   hysteresis;
3. optionally ``rebalance_exponent()`` (E tracks the corr-derived scale): where the factor
   ``f = 1 + corr_accum / (step * gs)`` reaches 3/2, ``E += 1`` and ``corr_accum`` is rescaled
   to ``f / 2``; where it falls to 2/3, ``E -= 1`` and it becomes ``2 f`` (S is kept up to
   integer rounding; the hysteresis 3/2 vs 2/3 prevents flip-flopping).

An empty batch (``x.numel() == 0``) gives the float layer's empty output (backward works, with
zero gradients for the input and bias) and changes no state: ``weight.grad`` and the last
statistics stay those of the earlier forwards.

Training state bytes per ternary weight (``T`` is the weight itself, not state): ``pressure``
1 + ``corr_accum`` 8/gs + ``E`` 1/gs + ``step`` 8/numel, i.e. 1.28 bytes with gs = 32.
Eval mode and ``torch.no_grad()`` forwards mutate nothing. ``2^E`` is computed as
``pow(2, E)`` (exact for integer E, and an op every exporter knows); the optimizer's step
builds the same float from its exponent field (``group_scale(..., bits=True)``).

The plain functions ``group_sums``, ``scale_groups``, ``group_scale`` and
``rebalance_exponent_`` hold the group arithmetic that the layer's methods and
``ScaledOptum``'s fast step share.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera._validate import choice, integer, require
from chimera.nn.bit_layers import ConvGeometry
from chimera.quant.functions import (
    ACT_QUANT_MODES,
    abs_stat,
    quantize_activations,
    quantize_weight_chimera,
)
from chimera.quant.stats import stats_from_counts, ternary_counts

INIT_ALPHA = 0.7  # threshold factor of the chimera quantizer used to initialise T
E_MIN, E_MAX = -126, 126  # exponent range (2^(E+1) stays a finite float32)
MAX_THRESHOLD = 127  # pressure is int8


def group_sums(x: Tensor, group_size: int, dtype: torch.dtype | None = None) -> Tensor:
    """Sums over the groups of ``group_size`` consecutive columns: of a (out, groups, gs) view,
    or of a (out, fan_in) tensor whose last group per row may be partial (views, no padded
    copy). Shape (out, groups)."""
    if x.dim() == 3:
        return x.sum(-1, dtype=dtype)
    out, fan_in = x.shape
    full = fan_in // group_size
    head = x[:, : full * group_size].reshape(out, full, group_size).sum(-1, dtype=dtype)
    if full * group_size == fan_in:
        return head
    return torch.cat([head, x[:, full * group_size:].sum(-1, keepdim=True, dtype=dtype)], 1)


def scale_groups(x: Tensor, values: Tensor, group_size: int) -> Tensor:
    """``x`` times the value of each column's group (``values``: (out, groups)); ``x`` is a
    (out, groups, gs) view or a (out, fan_in) tensor as in :func:`group_sums`."""
    if x.dim() == 3:
        return x * values.unsqueeze(-1)
    out, fan_in = x.shape
    full = fan_in // group_size
    head = x[:, : full * group_size].reshape(out, full, group_size) * values[:, :full, None]
    if full * group_size == fan_in:
        return head.view(out, fan_in)
    # head and tail, not one expanded column vector: inductor (torch 2.13, CPU) miscompiles
    # expand -> reshape -> slice here
    return torch.cat([head.view(out, -1), x[:, full * group_size:] * values[:, full:]], 1)


def group_scale(E: Tensor, corr_accum: Tensor, step: Tensor, group_size: int,
                bits: bool = False) -> Tensor:
    """``S = 2^E * (1 + corr_accum / (step * gs))``, ``2^E`` while ``step == 0`` (float32).
    ``2^E`` is ``pow(2, E)`` (exact, and an op every exporter knows) or, with ``bits``, the
    float32 whose exponent field is ``E + 127`` (the same value; compiled for CPU it is a
    shift where ``pow`` is a scalar ``exp2`` call per element)."""
    if bits:
        power = ((E.to(torch.int32) + 127) << 23).view(torch.float32)
    else:
        power = torch.pow(2.0, E.float())
    n = (step * group_size).clamp_min(1).float()  # tensor ops: no device sync
    return torch.where(step > 0, power * (1 + corr_accum.float() / n), power)


def rebalance_exponent_(E: Tensor, corr_accum: Tensor, step: Tensor, group_size: int) -> None:
    """In place, where ``f = 1 + corr / n`` (``n = step * gs``) left [2/3, 3/2):
    ``f >= 3/2``: ``E += 1``, ``corr = floor((corr - n) / 2)``; ``0 < f <= 2/3``: ``E -= 1``,
    ``corr = 2 corr + n`` (``S`` kept up to integer rounding; E stays in [E_MIN, E_MAX])."""
    n = step * group_size
    total = corr_accum + n  # = f * n
    up = (2 * total >= 3 * n) & (E < E_MAX) & (n > 0)
    down = (3 * total <= 2 * n) & (E > E_MIN) & (total > 0)  # S = 0 keeps its E
    corr = torch.where(up, (corr_accum - n).div(2, rounding_mode="floor"), corr_accum)
    corr_accum.copy_(torch.where(down, 2 * corr + n, corr))
    E.add_(up.to(torch.int8) - down.to(torch.int8))


class IntTernaryModule(nn.Module):
    """Common logic of the integer-ternary layers; subclasses only add geometry and the F call.

    ``weight_shape`` is (out, *fan_in_dims). ``act_quant`` in {per_tensor, per_token, none}.
    """

    _FLOAT_TYPE: type[nn.Module]  # the float layer that ``from_float`` converts

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool = True,
        group_size: int = 32,
        act_quant: str = "per_tensor",
    ) -> None:
        super().__init__()
        self.group_size = integer("group_size", group_size, 1)
        self.act_quant = choice("act_quant", act_quant, ACT_QUANT_MODES)
        require(all(d > 0 for d in weight_shape), "weight_shape", weight_shape, "positive")
        out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
        self.fan_in = fan_in
        num_groups = -(-fan_in // group_size)
        self.register_buffer("T", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("E", torch.zeros(out, num_groups, dtype=torch.int8))
        self.register_buffer("corr_accum", torch.zeros(out, num_groups, dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("pressure", torch.zeros(weight_shape, dtype=torch.int8))
        self.weight = nn.Parameter(torch.zeros(weight_shape))  # the cache of W (docstring)
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None
        self._last_counts: Tensor | None = None
        self._last_gamma: Tensor | None = None
        init = torch.empty(weight_shape)
        nn.init.kaiming_uniform_(init, a=math.sqrt(5))  # nn.Linear / nn.ConvNd default
        self.load_float_weight(init)
        if bias:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- weight representation -------------------------------------------------------------

    def _grouped(self, t: Tensor) -> Tensor:
        """(out, *fan_in_dims) -> (out, groups, gs), zero-padding the last group of each row."""
        rows = t.reshape(t.shape[0], self.fan_in)
        pad = self.E.shape[1] * self.group_size - self.fan_in
        return F.pad(rows, (0, pad)).view(t.shape[0], -1, self.group_size)

    @torch.no_grad()
    def load_float_weight(self, w: Tensor) -> None:
        """Set ``T``, ``E`` from a float weight and reset the training state.

        ``T = quantize_weight_chimera(w, gamma, 0.7)`` with ``gamma = mean|w|``; per group
        ``E = round(log2 s)`` with ``s`` the least-squares ternary scale of the group (mean |w|
        over its non-zero T; the layer's value for groups whose T is all 0).
        """
        if w.shape != self.T.shape:
            raise ValueError(f"weight must have shape {tuple(self.T.shape)}, got {tuple(w.shape)}")
        w = w.detach().float()
        t = quantize_weight_chimera(w, abs_stat(w), INIT_ALPHA)
        nz = self._grouped(t.abs())
        mag = self._grouped(w.abs()) * nz
        layer_scale = mag.sum() / nz.sum().clamp_min(1)
        scale = torch.where(
            nz.sum(-1) > 0, mag.sum(-1) / nz.sum(-1).clamp_min(1), layer_scale
        ).clamp_min(torch.finfo(torch.float32).tiny)
        self.T.copy_(t.to(torch.int8))
        self.E.copy_(torch.log2(scale).round().clamp(E_MIN, E_MAX).to(torch.int8))
        self.corr_accum.zero_()
        self.step.zero_()
        self.pressure.zero_()
        self.sync_weight()

    def group_scale(self) -> Tensor:
        """Per-group ``S = 2^E * (1 + corr_accum / (step * gs))`` (float32, shape (out, groups))."""
        return group_scale(self.E, self.corr_accum, self.step, self.group_size)

    def effective_weight(self) -> Tensor:
        """``W = T * S`` in the weight's shape (float32, no grad)."""
        with torch.no_grad():
            rows = self.T.reshape(self.T.shape[0], self.fan_in).float()
            return scale_groups(rows, self.group_scale(), self.group_size).view(self.T.shape)

    @torch.no_grad()
    def sync_weight(self) -> None:
        """Rewrite the ``weight`` cache from the integer state: ``weight = W`` (its dtype)."""
        self.weight.copy_(self.effective_weight())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "weight" in missing_keys:  # a checkpoint from before the cache existed
            missing_keys.remove(prefix + "weight")
        self.sync_weight()  # the loaded integer state defines W

    # ---- forward --------------------------------------------------------------------------

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:  # no activations: no gradient for W, no statistics (docstring)
            return self._project(x, self.weight.detach().to(x.dtype), self.bias)
        with torch.no_grad():
            self._last_counts = ternary_counts(self.T)
            self._last_gamma = self.group_scale().mean()
        return self._project(quantize_activations(x, self.act_quant), self.weight.to(x.dtype),
                             self.bias)

    def get_last_stats(self) -> dict[str, float] | None:
        """``{gamma, zero_ratio, plus_ratio, minus_ratio, effective_bits, num_weights}`` of the
        last forward (gamma = mean group scale S); ``None`` before the first forward."""
        if self._last_counts is None:
            return None
        stats = stats_from_counts(*self._last_counts.tolist())
        return {"gamma": float(self._last_gamma), **stats, "num_weights": self.T.numel()}

    # ---- integer updates ------------------------------------------------------------------

    @property
    def weight_grad(self) -> Tensor | None:
        """``dL/dW`` accumulated since the last ``zero_grad`` (``weight.grad``), non-finite
        entries read as 0; None without one."""
        grad = self.weight.grad
        return None if grad is None else torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def update_corr(self, grad: Tensor | None = None) -> bool:
        """``step += 1``; per group ``corr_accum += sum(descent_sign * T)`` with
        ``descent_sign = -sign(grad)`` (int16; ``grad`` defaults to ``weight_grad``). Returns
        False (and changes nothing) without a gradient."""
        grad = self.weight_grad if grad is None else grad
        if grad is None:
            return False
        descent = -torch.sign(grad).to(torch.int16) * self.T
        self.step += 1
        self.corr_accum += group_sums(descent.reshape(descent.shape[0], self.fan_in),
                                      self.group_size, torch.int64)
        self.sync_weight()
        return True

    @torch.no_grad()
    def update_ternary(self, increment: Tensor, threshold: int) -> None:
        """``pressure += increment`` (int16, weight shape); where ``|pressure| >= threshold``:
        ``T = clamp(T + sign(pressure), -1, 1)`` and ``pressure = 0`` (so it stays int8).
        """
        integer("threshold", threshold, 1, MAX_THRESHOLD)
        p = self.pressure.to(torch.int16) + increment
        fire = p.abs() >= threshold
        moved = (self.T.to(torch.int16) + p.sign()).clamp_(-1, 1)
        self.T.copy_(torch.where(fire, moved, self.T.to(torch.int16)))
        self.pressure.copy_(p.masked_fill_(fire, 0))
        self.sync_weight()

    @torch.no_grad()
    def rebalance_exponent(self) -> None:
        """Shift ``E`` where the factor ``f = 1 + corr/(step*gs)`` left [2/3, 3/2), keeping S.

        ``f >= 3/2``: ``E += 1``, ``corr = floor((corr - n) / 2)`` (f -> f/2);
        ``0 < f <= 2/3``: ``E -= 1``, ``corr = 2 corr + n`` (f -> 2 f); n = step * gs.
        """
        rebalance_exponent_(self.E, self.corr_accum, self.step, self.group_size)
        self.sync_weight()

    def extra_repr(self) -> str:
        return f"bias={self.bias is not None}, group_size={self.group_size}"

    def state_bytes(self) -> int:
        """Bytes of integer training state (everything but the weight ``T`` itself and the
        ``weight`` cache)."""
        return sum(b.numel() * b.element_size() for b in (self.pressure, self.corr_accum,
                                                           self.E, self.step))

    # ---- conversion -----------------------------------------------------------------------

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        """The constructor arguments of the layer replacing the float layer ``module``."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, module: nn.Module, **kwargs) -> IntTernaryModule:
        """The integer-ternary twin of an ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (weights via
        :meth:`load_float_weight`, bias copied). On this base class it picks the subclass."""
        if cls is IntTernaryModule:
            for sub in (IntTernaryLinear, IntTernaryConv1d, IntTernaryConv2d):
                if type(module) is sub._FLOAT_TYPE:
                    return sub.from_float(module, **kwargs)
        if type(module) is not getattr(cls, "_FLOAT_TYPE", None):
            raise TypeError(f"{cls.__name__}.from_float cannot convert {type(module).__name__}")
        layer = cls(**cls._float_args(module), **kwargs)
        layer.to(module.weight.device)
        layer.load_float_weight(module.weight)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer


class IntTernaryLinear(IntTernaryModule):
    """Integer-ternary ``nn.Linear``: ``y = x_q @ (T * S)^T + bias``."""

    _FLOAT_TYPE = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 32,
        act_quant: str = "per_tensor",
    ) -> None:
        self.in_features = integer("in_features", in_features, 1)
        self.out_features = integer("out_features", out_features, 1)
        super().__init__((out_features, in_features), bias, group_size, act_quant)

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @classmethod
    def _float_args(cls, module: nn.Linear) -> dict[str, Any]:
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                + super().extra_repr())


class _IntTernaryConvNd(ConvGeometry, IntTernaryModule):
    """Integer-ternary convolution (zero padding); the subclass sets ``_DIMS`` and ``_CONV``.
    Besides the geometry it takes ``group_size`` and ``act_quant`` (after ``bias``)."""


class IntTernaryConv1d(_IntTernaryConvNd):
    """Integer-ternary ``nn.Conv1d``; groups run along the flattened (in/groups)*k fan-in."""

    _DIMS, _CONV, _FLOAT_TYPE = 1, F.conv1d, nn.Conv1d


class IntTernaryConv2d(_IntTernaryConvNd):
    """Integer-ternary ``nn.Conv2d``; groups run along the flattened (in/groups)*k*k fan-in."""

    _DIMS, _CONV, _FLOAT_TYPE = 2, F.conv2d, nn.Conv2d
