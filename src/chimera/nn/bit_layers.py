"""Ternary-weight layers with int8 activations (docs/algorithms.md#bit-layers): BitLinear,
BitConv1d, BitConv2d; and :class:`ConvGeometry`, the convolution geometry that the Bit, the
integer-ternary and the packed convolutions share.

Forward (all quantization logic lives in :class:`BitLayer`; subclasses only add geometry):

1. ``x_ste = x + (beta * clamp(round(x / beta), -127, 127) - x).detach()``,
   ``beta = max|x| / 127 + eps_beta`` per tensor or per row of the last dimension (``per_token``;
   for convolutions that is a row of the width axis); ``act_ste=False`` drops the STE as the
   original layers did (same value, no gradient reaches x)
2. training only: ``scale_ema = ema_update(scale_ema, abs_stat(W), rho_s)``
3. ``gamma = max(scale_ema, eps_gamma)``, ``alpha = alpha_tensor()``
4. ``T = quantize(W, gamma[, alpha])``; ``w_ste = clamp(W + (T - W).detach(), -ste_clip, ste_clip)``
   (the clamp acts on the forward value T, so any ``ste_clip >= 1`` leaves values and gradients
   unchanged; ``ste_clip < 1`` shrinks nonzero weights to ``±ste_clip`` and blocks their gradient)
5. ``y = gamma * (x_ste @ w_ste^T) + bias``, computed as ``F.linear(x_ste, gamma * w_ste, bias)``
   (convolutions: ``F.conv*`` with the layer's geometry in place of ``F.linear``)
6. remember the statistics for ``get_last_stats()``; training only: ``forward_step += 1``

An empty batch (``x.numel() == 0``) gives the float layer's empty output (backward works, with
zero gradients) and changes no state: no scale EMA update, no warm-up step, the last statistics
kept (it is no training step and has no activations to quantize).

Alpha schedule: ``alpha_override`` if set; else ``alpha_target`` if ``warmup_steps <= 1``; else
``alpha_min + (alpha_target - alpha_min) * min(forward_step / (warmup_steps - 1), 1)``, i.e. the
first training forward (``forward_step == 0``) uses alpha_min, training forward number
``warmup_steps`` (1-based) and all later ones alpha_target, linear in between. It is computed on
the device from the ``forward_step`` buffer (:meth:`BitLayer.alpha_tensor`), so a forward never
syncs with the host and traces into one graph (``torch.compile(fullgraph=True)``,
``torch.export``). ``strict_bitnet`` ignores alpha (it equals ``chimera`` at alpha 0.5); the
reported alpha is still the schedule's. ``alpha_target`` and ``alpha_override`` (set at run time
by a controller) are saved in the ``state_dict`` as the module's extra state, so a checkpoint
restores the exact threshold. A float layer's checkpoint (``weight``, no ``weight_master``) loads
too: see :func:`load_float_weights`.

Fast path (``compiled``): steps 1-4 live in one function, :func:`quantized_operands`, the ground
truth. ``compiled=True`` runs it under ``torch.compile`` (inductor fuses the activation
quantizer into two passes over x and the weight path, scale EMA and ternary counts into two
passes over W, forward and backward); ``False`` runs it eagerly; ``None`` (default) compiles
only on CUDA when triton is usable, so CPU behaviour never changes by default (on CPU the
compile costs tens of seconds per graph; see docs/performance.md). One change is made for the
compiled run only: with ``ste_clip >= 1`` the clamp is dropped, since ``w_ste`` already lies in
[-1, 1] (``W + (T - W)`` rounds to a value of magnitude <= 1 for every finite W) and the clamp
passes every such gradient, so values and gradients are unchanged while inductor need not save a
mask. A parity test pins compiled against eager (outputs, all gradients, scale EMA, state).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera._validate import (
    choice,
    integer,
    number,
    optional_bool,
    optional_number,
    require,
)
from chimera.compile_support import compile_usable
from chimera.quant import functions
from chimera.quant.functions import (
    ACT_QUANT_MODES,
    STAT_MODES,
    abs_stat,
    ema_update,
    quantize_activations,
)
from chimera.quant.stats import stats_from_counts, ternary_counts

WEIGHT_QUANTIZERS: dict[str, Callable[[Tensor, Tensor, Tensor | float], Tensor]] = {
    "strict_bitnet": lambda w, gamma, alpha: functions.quantize_weight_strict_bitnet(w, gamma),
    "chimera": functions.quantize_weight_chimera,
}
QUANT_MODES = tuple(WEIGHT_QUANTIZERS)
# torch.compile backend of the fast path; "aot_eager" traces and partitions like inductor but
# runs eager kernels (the CPU tests use it: inductor's C++ builds take tens of seconds)
COMPILE_BACKEND = "inductor"


def quantized_operands(
    x: Tensor,
    w: Tensor,
    scale_ema: Tensor,
    *,
    update_ema: bool,
    rho_s: float,
    stat_mode: str,
    eps_gamma: float,
    alpha: Tensor,
    quant_mode: str,
    ste_clip: float | None,
    act_quant: str,
    act_ste: bool,
    eps_beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-4 of the forward: ``(x_ste, gamma * w_ste, gamma, [#0, #(+1), #(-1)] of T)``.

    ``update_ema`` (training) first sets ``scale_ema = ema_update(scale_ema, abs_stat(W), rho_s)``
    in place. The eager ground truth of both paths (see the module docstring).
    """
    x_ste = quantize_activations(x, act_quant, eps_beta, ste=act_ste)
    if update_ema:
        with torch.no_grad():
            scale_ema.copy_(ema_update(scale_ema, abs_stat(w.detach(), stat_mode), rho_s))
    gamma = scale_ema.clamp(min=eps_gamma)
    t = WEIGHT_QUANTIZERS[quant_mode](w.detach(), gamma, alpha)
    w_ste = w + (t - w).detach()
    if ste_clip is not None:
        w_ste = w_ste.clamp(-ste_clip, ste_clip)
    return x_ste, gamma * w_ste, gamma, ternary_counts(t)


@functools.cache
def compiled_operands(config: tuple[Any, ...], backend: str) -> Callable[..., tuple[Tensor, ...]]:
    """``torch.compile(quantized_operands, dynamic=True, backend=backend)`` for one static
    ``config`` (the non-tensor keyword arguments, and the ranks of x and W, as sorted
    items). Each config compiles a private copy of the function's code object: dynamo keeps graphs
    and its recompile limit per code object, so many layer configurations in one process never
    push each other back to eager. Shapes are dynamic (one graph serves every layer size of a
    config; the caller passes W as a view, since dynamo keeps a Parameter's shape static)."""
    code = quantized_operands.__code__.replace()
    fn = types.FunctionType(code, quantized_operands.__globals__, quantized_operands.__name__,
                            quantized_operands.__defaults__, quantized_operands.__closure__)
    fn.__kwdefaults__ = quantized_operands.__kwdefaults__
    return torch.compile(fn, dynamic=True, backend=backend)


class BitLayer(nn.Module):
    """Shared ternary quantization logic; subclasses define ``_FLOAT_TYPE``, ``_float_args`` and
    ``_project(x, weight, bias)`` (the float op applied to the scaled ternary weight).

    ``compiled`` (attribute and keyword): True runs steps 1-4 under ``torch.compile``, False
    eagerly, None (default) compiled on CUDA when triton is usable, eager elsewhere.
    ``act_ste`` (default True): the activation straight-through estimator; False reproduces the
    original project's layers, whose ``round`` passes no gradient to x.
    """

    _FLOAT_TYPE: type[nn.Module]

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        *,
        stat_mode: str = "mean",
        rho_s: float = 0.95,
        alpha_min: float = 0.0,
        alpha_target: float = 0.7,
        warmup_steps: int = 100,
        quant_mode: str = "chimera",
        eps_gamma: float = 1e-6,
        eps_beta: float = 1e-6,
        ste_clip: float | None = 1.0,
        act_quant: str = "per_tensor",
        act_ste: bool = True,
        compiled: bool | None = None,
    ) -> None:
        super().__init__()
        self.compiled = optional_bool("compiled", compiled)
        require(isinstance(act_ste, bool), "act_ste", act_ste, "True or False")
        self.act_ste = act_ste
        self.stat_mode = choice("stat_mode", stat_mode, STAT_MODES)
        self.quant_mode = choice("quant_mode", quant_mode, QUANT_MODES)
        self.act_quant = choice("act_quant", act_quant, ACT_QUANT_MODES)
        self.rho_s = number("rho_s", rho_s, 0, 1)
        self.alpha_min = number("alpha_min", alpha_min, 0)
        self.alpha_target = alpha_target
        self.alpha_override: float | None = None
        self.warmup_steps = integer("warmup_steps", warmup_steps, 0)
        self.eps_gamma = number("eps_gamma", eps_gamma, 0, low_open=True)
        self.eps_beta = number("eps_beta", eps_beta, 0, low_open=True)
        self.ste_clip = optional_number("ste_clip", ste_clip, 0, low_open=True)
        fp32 = torch.float32
        self.weight_master = nn.Parameter(torch.empty(weight_shape, dtype=fp32))
        self.bias = nn.Parameter(torch.empty(weight_shape[:1], dtype=fp32)) if bias else None
        self.register_buffer("scale_ema", torch.zeros(()))
        self.register_buffer("forward_step", torch.zeros((), dtype=torch.int64))
        self._last_stats: tuple[Tensor, Tensor, Tensor] | None = None
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(load_float_weights)

    # -- alpha ------------------------------------------------------------------------------
    @property
    def alpha_target(self) -> float:
        """Threshold factor after warm-up; settable at run time (e.g. by a controller)."""
        return self._alpha_target

    @alpha_target.setter
    def alpha_target(self, value: float) -> None:
        self._alpha_target = number("alpha_target", value, 0)

    @property
    def alpha_override(self) -> float | None:
        """When not ``None``, the alpha of every forward (skips the warm-up)."""
        return self._alpha_override

    @alpha_override.setter
    def alpha_override(self, value: float | None) -> None:
        self._alpha_override = optional_number("alpha_override", value, 0)

    def alpha_tensor(self) -> Tensor:
        """The alpha of the next forward as a 0-dim tensor on the layer's device, without a host
        sync: ``alpha_override``, else ``alpha_target`` if ``warmup_steps <= 1``, else
        ``alpha_min + (alpha_target - alpha_min) * min(forward_step / (warmup_steps - 1), 1)``.

        float64 (MPS: float32), so each value equals the same formula in Python floats.
        """
        step = self.forward_step
        dtype = torch.float32 if step.device.type == "mps" else torch.float64  # MPS has no fp64
        if self.alpha_override is not None:
            return torch.full((), self.alpha_override, dtype=dtype, device=step.device)
        if self.warmup_steps <= 1:
            return torch.full((), self.alpha_target, dtype=dtype, device=step.device)
        progress = (step.to(dtype) / (self.warmup_steps - 1)).clamp(max=1.0)
        return self.alpha_min + (self.alpha_target - self.alpha_min) * progress

    def current_alpha(self) -> float:
        """:meth:`alpha_tensor` as a Python float (a host sync)."""
        return float(self.alpha_tensor())

    def quantize_weight(
        self, gamma: Tensor | float | None = None, alpha: Tensor | float | None = None
    ) -> Tensor:
        """The ternary T of the current latent weights (detached), at ``gamma`` (default the
        current ``max(scale_ema, eps_gamma)``) and ``alpha`` (default the schedule's); changes
        no state."""
        gamma = self.scale_ema.clamp(min=self.eps_gamma) if gamma is None else gamma
        alpha = self.alpha_tensor() if alpha is None else alpha
        return WEIGHT_QUANTIZERS[self.quant_mode](self.weight_master.detach(), gamma, alpha)

    def get_extra_state(self) -> Tensor:
        """``[alpha_target, has_override, alpha_override or 0]`` as float64 (exact floats)."""
        override = self.alpha_override
        return torch.tensor([self.alpha_target, override is not None, override or 0.0],
                            dtype=torch.float64)

    def set_extra_state(self, state: Tensor) -> None:
        """Restore ``alpha_target`` and ``alpha_override`` from :meth:`get_extra_state`."""
        if not isinstance(state, Tensor) or state.shape != (3,):
            raise ValueError("the extra state of a Bit layer must be a tensor of 3 values "
                             "[alpha_target, has_override, alpha_override]")
        target, has_override, override = state.tolist()
        self.alpha_target = target
        self.alpha_override = override if has_override else None

    # -- parameters -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """nn.Linear's init (kaiming-uniform a=sqrt(5), bias U(±1/sqrt(fan_in))); scale from W."""
        nn.init.kaiming_uniform_(self.weight_master, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight_master[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_scale()

    @torch.no_grad()
    def reset_scale(self) -> None:
        """``scale_ema = abs_stat(W)``."""
        self.scale_ema.copy_(abs_stat(self.weight_master, self.stat_mode))

    @classmethod
    def from_float(cls, module: nn.Module, **quant_kwargs: Any) -> BitLayer:
        """A layer of the same geometry holding ``module``'s weight and bias as latent weights."""
        if type(module) is not cls._FLOAT_TYPE:
            raise TypeError(
                f"{cls.__name__}.from_float expects {cls._FLOAT_TYPE.__name__}, "
                f"got {type(module).__name__}"
            )
        layer = cls(**cls._float_args(module), **quant_kwargs)
        layer.to(module.weight.device)
        with torch.no_grad():
            layer.weight_master.copy_(module.weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        layer.reset_scale()
        return layer.train(module.training)

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    # -- forward ----------------------------------------------------------------------------
    def use_compiled(self, x: Tensor) -> bool:
        """Whether this forward runs the compiled steps 1-4 (never inside an outer compile,
        which traces the eager function itself)."""
        if torch.compiler.is_compiling():
            return False
        if self.compiled is not None:
            return self.compiled
        return compile_usable(x.device.type)

    def forward(self, x: Tensor) -> Tensor:
        empty = x.numel() == 0  # an empty batch changes no state (module docstring)
        static = dict(update_ema=self.training and not empty, rho_s=self.rho_s,
                      stat_mode=self.stat_mode, eps_gamma=self.eps_gamma,
                      quant_mode=self.quant_mode, ste_clip=self.ste_clip,
                      act_quant="none" if empty else self.act_quant, act_ste=self.act_ste,
                      eps_beta=self.eps_beta)
        operands, w = quantized_operands, self.weight_master
        if not empty and self.use_compiled(x):
            if self.ste_clip is not None and self.ste_clip >= 1:
                static["ste_clip"] = None  # the identity on w_ste (module docstring)
            key = (*sorted(static.items()), ("x_dim", x.dim()), ("w_dim", w.dim()))
            operands = compiled_operands(key, COMPILE_BACKEND)
            w = w.view(w.shape)  # a plain tensor: dynamo keeps Parameter shapes static
        alpha = self.alpha_tensor()
        x_ste, weight, gamma, counts = operands(x, w, self.scale_ema, alpha=alpha, **static)
        y = self._project(x_ste, weight, self.bias)
        if not empty and not torch.compiler.is_exporting():  # export keeps no traced stats
            self._last_stats = (gamma.detach(), alpha, counts)
            if self.training:
                self.forward_step.add_(1)
        return y

    def get_last_stats(self) -> dict[str, float] | None:
        """``{gamma, alpha, zero_ratio, plus_ratio, minus_ratio, effective_bits, num_weights}``
        of the last forward as Python numbers (``None`` before the first one); the forward
        keeps them as device tensors, converted only here."""
        if self._last_stats is None:
            return None
        gamma, alpha, counts = self._last_stats
        stats = stats_from_counts(*counts.tolist())
        return {"gamma": float(gamma), "alpha": float(alpha), **stats,
                "num_weights": self.weight_master.numel()}

    def extra_repr(self) -> str:
        return (f"quant_mode={self.quant_mode}, alpha_target={self.alpha_target}, "
                f"warmup_steps={self.warmup_steps}, act_quant={self.act_quant}, "
                f"act_ste={self.act_ste}, bias={self.bias is not None}")


def load_float_weights(
    layer: BitLayer, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """``load_state_dict`` pre-hook of every Bit layer: a float layer's checkpoint (``weight``
    and no ``weight_master`` under ``prefix``) loads as latent weights, so
    ``ternarized.load_state_dict(float_model.state_dict())`` works, strict included.

    ``weight`` becomes ``weight_master``; a missing ``scale_ema`` is ``abs_stat`` of that weight
    (as :meth:`BitLayer.from_float` sets it), a missing ``forward_step`` 0 (the warm-up starts
    over) and missing extra state the layer's current ``alpha_target`` / ``alpha_override``.
    """
    weight = state_dict.get(prefix + "weight")
    if weight is None or prefix + "weight_master" in state_dict:
        return
    del state_dict[prefix + "weight"]
    state_dict[prefix + "weight_master"] = weight
    if prefix + "scale_ema" not in state_dict:
        latent = weight.detach().to(layer.weight_master.dtype)
        state_dict[prefix + "scale_ema"] = abs_stat(latent, layer.stat_mode)
    state_dict.setdefault(prefix + "forward_step", torch.zeros((), dtype=torch.int64))
    state_dict.setdefault(prefix + "_extra_state", layer.get_extra_state())


class BitLinear(BitLayer):
    """Ternary ``nn.Linear``: ``y = gamma * (x_ste @ w_ste^T) + bias``."""

    _FLOAT_TYPE = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 **quant_kwargs: Any) -> None:
        self.in_features = integer("in_features", in_features, 1)
        self.out_features = integer("out_features", out_features, 1)
        super().__init__((out_features, in_features), bias, **quant_kwargs)

    @classmethod
    def _float_args(cls, module: nn.Linear) -> dict[str, Any]:
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                + super().extra_repr())


class ConvGeometry:
    """The geometry every ternary N-d convolution shares (Bit, integer-ternary and packed
    layers): ``nn.Conv1d``/``nn.Conv2d``'s constructor arguments, validated (zero padding only).

    Mixed in before the layer's base class, whose constructor receives ``(weight_shape, bias,
    *layer_args, **layer_kwargs)``; the concrete class sets ``_DIMS`` and ``_CONV``
    (``F.conv1d``/``F.conv2d``), which ``_project`` applies with this geometry.
    """

    GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "groups")
    _DIMS: int
    _CONV: Callable[..., Tensor]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        *layer_args: Any,
        **layer_kwargs: Any,
    ) -> None:
        self.in_channels = integer("in_channels", in_channels, 1)
        self.out_channels = integer("out_channels", out_channels, 1)
        self.groups = integer("groups", groups, 1)
        require(in_channels % groups == 0 and out_channels % groups == 0, "groups", groups,
                f"a divisor of in_channels ({in_channels}) and out_channels ({out_channels})")
        self.kernel_size = self._ints("kernel_size", kernel_size, 1)
        self.stride = self._ints("stride", stride, 1)
        self.dilation = self._ints("dilation", dilation, 1)
        self.padding: tuple[int, ...] | str
        if isinstance(padding, str):
            self.padding = choice("padding", padding, ("same", "valid"))
            require(padding == "valid" or all(s == 1 for s in self.stride), "padding", padding,
                    f"'valid' or ints with stride {self.stride} ('same' needs stride 1)")
        else:
            self.padding = self._ints("padding", padding, 0)
        weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        super().__init__(weight_shape, bias, *layer_args, **layer_kwargs)

    @classmethod
    def _ints(cls, name: str, value: int | tuple[int, ...], minimum: int) -> tuple[int, ...]:
        """An int or ``_DIMS`` ints (a list too) as a tuple of ``_DIMS`` ints >= ``minimum``."""
        values = (value,) * cls._DIMS if isinstance(value, int) else tuple(value)
        require(len(values) == cls._DIMS, name, value, f"an int or {cls._DIMS} ints")
        return tuple(integer(name, v, minimum) for v in values)

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        """The constructor arguments of the layer replacing the float convolution ``module``."""
        mode = module.padding_mode
        require(mode == "zeros", "padding_mode", mode, "'zeros' (ternary layers pad with zeros)")
        return {**{n: getattr(module, n) for n in cls.GEOMETRY}, "bias": module.bias is not None}

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return type(self)._CONV(x, weight, bias, self.stride, self.padding, self.dilation,
                                self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, " + super().extra_repr())


class _BitConvNd(ConvGeometry, BitLayer):
    """Ternary N-d convolution (zero padding only); ``_DIMS`` and ``_CONV`` set the geometry."""


class BitConv1d(_BitConvNd):
    """Ternary ``nn.Conv1d``."""

    _DIMS, _CONV, _FLOAT_TYPE = 1, F.conv1d, nn.Conv1d


class BitConv2d(_BitConvNd):
    """Ternary ``nn.Conv2d``."""

    _DIMS, _CONV, _FLOAT_TYPE = 2, F.conv2d, nn.Conv2d


ChimeraConv2d = BitConv2d  # the original project's name
