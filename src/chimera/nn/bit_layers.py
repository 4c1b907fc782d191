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

Paths. Steps 1-4 live in one function, :func:`quantized_operands`, the ground truth; tracers
(``torch.compile`` around the model, ``torch.export``, ``torch.jit.trace``, ``torch.func``
transforms) and empty batches run it as written. Otherwise a forward takes one of three
paths, each pinned bit for bit against it by a parity test (outputs, all gradients, scale
EMA, state, statistics):

- eval cache (eval mode, no gradient to W: ``no_grad``, ``inference_mode`` or a frozen W): the
  weight operand ``gamma * w_ste`` is computed once per weight version and reused
  (:meth:`BitLayer.cached_weight`); the key holds the version counters, storage, dtype and
  device of W, scale_ema and forward_step and every quantizer setting (alpha_override,
  alpha_target, alpha_min, warmup_steps, quant_mode, eps_gamma, ste_clip), so an optimizer
  step, ``load_state_dict``, ``.to()`` or a new alpha recomputes it. An operand made in
  ``inference_mode`` is not reused outside it. A forward then costs the activation quantizer
  and the float op. Training mode drops the cache.
- eager (``compiled=False``, and ``None`` on CPU): :func:`fast_weight_operand` builds
  ``gamma * T`` on one weight-sized buffer in about five passes over W (``|W|``, its mean,
  ``hardshrink``, ``sign_``, ``mul_``; the buffer of the last forward is reused when nothing
  else holds it) and :class:`WeightSTE` passes ``gamma * grad`` to W in one in-place pass; it
  applies where ``gamma * T`` equals ``gamma * w_ste`` bit for bit (CPU, float32/float64,
  ``ste_clip`` None or >= 1, finite ``|W| < 2^23``), elsewhere the formula runs.
- compiled (``compiled=True``, and ``None`` on CUDA when triton is usable): steps 1-4 under
  ``torch.compile`` (inductor fuses the activation quantizer into two passes over x and the
  weight path, scale EMA and ternary counts into two passes over W, forward and backward).
  On CPU it is not faster than the eager path at the sizes measured (BitLinear 1024 at batch
  256, 2048 at 16, 4096 at 1) and costs a compile per configuration, so ``None`` stays eager
  there (docs/performance.md). One change is made for the compiled run only: with
  ``ste_clip >= 1`` the clamp is dropped, since ``w_ste`` already lies in [-1, 1] for every
  finite ``|W| < 2^24`` and the clamp passes every such gradient, so values and gradients are
  unchanged while inductor need not save a mask.

Statistics are kept as device tensors: the compiled and formula paths count T in the forward,
the eager and cached paths keep the weight operand and count it on the first
:meth:`BitLayer.get_last_stats` (once per weight version in eval).
"""

from __future__ import annotations

import functools
import math
import types
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
    scaled_ternary,
    stat_of_magnitudes,
    traced,
)
from chimera.quant.stats import sign_counts, stats_from_counts, ternary_counts

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
    weight, t = ste_weight(w, gamma, alpha, quant_mode, ste_clip)
    return x_ste, weight, gamma, ternary_counts(t)


def ste_weight(
    w: Tensor, gamma: Tensor, alpha: Tensor, quant_mode: str, ste_clip: float | None
) -> tuple[Tensor, Tensor]:
    """Step 4 and the weight scaling of step 5: ``(gamma * w_ste, T)``."""
    t = WEIGHT_QUANTIZERS[quant_mode](w.detach(), gamma, alpha)
    w_ste = w + (t - w).detach()
    if ste_clip is not None:
        w_ste = w_ste.clamp(-ste_clip, ste_clip)
    return gamma * w_ste, t


def fast_weight_operand(
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
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Steps 2-4 without autograd on one weight-sized buffer (``out`` if given, else a new
    one): ``(gamma, q)``, ``q`` the value
    of ``gamma * w_ste`` (= ``gamma * T``), or ``None`` where this route does not apply (then
    the caller runs :func:`ste_weight` with this gamma). Either way the EMA is updated once.

    The route: ``|W|`` into the buffer, the EMA statistic from it, then
    :func:`~chimera.quant.functions.scaled_ternary` in place (about five passes over W, one
    allocation). It applies on CPU to float32/float64 weights, a finite gamma, ``ste_clip``
    None or >= 1 (the clamp is then the identity on values and gradients) and
    ``max|W| < 1 / eps`` of the dtype (2^23 for float32; more than enough for
    ``W + (T - W) == T`` exactly, which holds below 2^24): the bound is ``mean|W| * numel``
    when the statistic was just computed, else one read pass for ``max|W|``. NaN or inf weights
    take the STE formula (where they give NaN).
    """
    exact = (w.device.type == "cpu" and plain_tensor(w)
             and w.dtype in (torch.float32, torch.float64) and scale_ema.dtype == w.dtype
             and (ste_clip is None or ste_clip >= 1))
    if not exact:
        if update_ema:
            scale_ema.copy_(ema_update(scale_ema, abs_stat(w, stat_mode), rho_s))
        return scale_ema.clamp(min=eps_gamma), None
    buf = torch.abs(w, out=torch.empty_like(w) if out is None else out)
    bound = None
    if update_ema:
        stat = stat_of_magnitudes(buf, stat_mode)
        scale_ema.copy_(ema_update(scale_ema, stat, rho_s))
        bound = stat * w.numel() if stat_mode == "mean" else None
    gamma = scale_ema.clamp(min=eps_gamma)
    limit = 1 / torch.finfo(w.dtype).eps
    small = (bound is not None and float(bound) < limit) or float(buf.max()) < limit
    if not (small and math.isfinite(float(gamma))):
        return gamma, None
    return gamma, scaled_ternary(w, gamma, alpha, quant_mode, out=buf)


def plain_tensor(t: Tensor) -> bool:
    """A real tensor with storage (no fake, meta or functorch-wrapped tensor)."""
    return (type(t) in (Tensor, nn.Parameter) and t.device.type != "meta"
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


class WeightSTE(torch.autograd.Function):
    """``gamma * w_ste`` from its precomputed value ``q = gamma * T``: the forward returns q,
    the backward ``gamma * grad`` to W, the gradient of the STE formula when the clamp passes
    everything (``ste_clip`` None or >= 1). No mask and no copy of W is saved.

    The only consumer of the output is the layer's projection, whose weight gradient is a new
    tensor that nothing else holds, so the backward scales it in place (out of place when the
    backward itself is recorded, ``create_graph=True``).
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, q: Tensor, gamma: Tensor) -> Tensor:
        ctx.save_for_backward(gamma)
        return q

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (gamma,) = ctx.saved_tensors
        scaled = grad.mul(gamma) if torch.is_grad_enabled() else grad.mul_(gamma)
        return scaled, None, None


class LazyCounts:
    """The ternary counts ``[#0, #(+1), #(-1)]`` of a forward, counted on first request from
    its weight operand ``q = gamma * T`` (:func:`~chimera.quant.stats.sign_counts`), which
    is then released."""

    __slots__ = ("_q", "_counts")

    def __init__(self, q: Tensor) -> None:
        self._q: Tensor | None = q
        self._counts: Tensor | None = None

    def get(self) -> Tensor:
        if self._counts is None:
            self._counts, self._q = sign_counts(self._q), None
        return self._counts


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
        self._last_stats: tuple[Tensor, Tensor, Tensor | LazyCounts] | None = None
        self._weight_cache: tuple[Any, ...] | None = None
        self._spare: Tensor | None = None  # see _take_spare
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
        if x.numel() == 0 or traced():
            return self._traced_forward(x)
        w = self.weight_master
        if not self.training and not (torch.is_grad_enabled() and w.requires_grad):
            return self._cached_forward(x)
        self._weight_cache = None  # training: the weights change every step
        if self.use_compiled(x):
            self._spare = None
            return self._compiled_forward(x)
        return self._eager_forward(x)

    def _static(self, empty: bool = False) -> dict[str, Any]:
        """The non-tensor keyword arguments of :func:`quantized_operands`."""
        return dict(update_ema=self.training and not empty, rho_s=self.rho_s,
                    stat_mode=self.stat_mode, eps_gamma=self.eps_gamma,
                    quant_mode=self.quant_mode, ste_clip=self.ste_clip,
                    act_quant="none" if empty else self.act_quant, act_ste=self.act_ste,
                    eps_beta=self.eps_beta)

    def _finish(self, y: Tensor, gamma: Tensor, alpha: Tensor,
                counts: Tensor | LazyCounts) -> Tensor:
        """Step 6: keep the statistics; training: count the forward."""
        self._last_stats = (gamma.detach(), alpha, counts)
        if self.training:
            self.forward_step.add_(1)
        return y

    def _traced_forward(self, x: Tensor) -> Tensor:
        """The ground truth as one traceable function (what ``torch.compile`` and
        ``torch.export`` see, and the empty batch, which changes no state)."""
        empty = x.numel() == 0
        alpha = self.alpha_tensor()
        x_ste, weight, gamma, counts = quantized_operands(
            x, self.weight_master, self.scale_ema, alpha=alpha, **self._static(empty))
        y = self._project(x_ste, weight, self.bias)
        if empty or torch.compiler.is_exporting():  # export keeps no traced stats
            return y
        return self._finish(y, gamma, alpha, counts)

    def _compiled_forward(self, x: Tensor) -> Tensor:
        """Steps 1-4 under ``torch.compile`` (:func:`compiled_operands`)."""
        static, w = self._static(), self.weight_master
        if self.ste_clip is not None and self.ste_clip >= 1:
            static["ste_clip"] = None  # the identity on w_ste (module docstring)
        key = (*sorted(static.items()), ("x_dim", x.dim()), ("w_dim", w.dim()))
        operands = compiled_operands(key, COMPILE_BACKEND)
        alpha = self.alpha_tensor()  # W as a plain view: dynamo keeps Parameter shapes static
        x_ste, weight, gamma, counts = operands(x, w.view(w.shape), self.scale_ema,
                                                alpha=alpha, **static)
        return self._finish(self._project(x_ste, weight, self.bias), gamma, alpha, counts)

    def _eager_forward(self, x: Tensor) -> Tensor:
        """Steps 1-4 eagerly: :func:`fast_weight_operand` and :class:`WeightSTE` where they
        apply (values and gradients of the formula, bit for bit), else the formula itself."""
        static, w = self._static(), self.weight_master
        self._last_stats = None  # release the last weight operand: its buffer may be reused
        alpha = self.alpha_tensor()
        with torch.no_grad():
            gamma, q = fast_weight_operand(
                w.detach(), self.scale_ema, alpha=alpha, update_ema=static["update_ema"],
                rho_s=self.rho_s, stat_mode=self.stat_mode, eps_gamma=self.eps_gamma,
                quant_mode=self.quant_mode, ste_clip=self.ste_clip, out=self._take_spare(w))
        self._spare = q
        if q is None:  # the EMA is updated already
            x_ste, weight, gamma, counts = quantized_operands(
                x, w, self.scale_ema, alpha=alpha, **{**static, "update_ema": False})
        else:
            x_ste = quantize_activations(x, self.act_quant, self.eps_beta, ste=self.act_ste)
            needs_grad = torch.is_grad_enabled() and w.requires_grad
            weight, counts = WeightSTE.apply(w, q, gamma) if needs_grad else q, LazyCounts(q)
        return self._finish(self._project(x_ste, weight, self.bias), gamma, alpha, counts)

    def _take_spare(self, w: Tensor) -> Tensor | None:
        """The last eager weight operand's buffer for the next one, when nothing but this layer
        holds its storage (no autograd graph, no view): a fresh weight-sized allocation costs
        page faults on every step. Kept between training forwards (one weight-sized buffer)."""
        spare, self._spare = self.__dict__.get("_spare"), None
        if (spare is None or spare.shape != w.shape or spare.stride() != w.stride()
                or spare.dtype != w.dtype or spare.device != w.device
                or (spare.is_inference() and not torch.is_inference_mode_enabled())):
            return None
        # use count 2: ``spare`` and the temporary storage object of this call
        return spare if torch._C._storage_Use_Count(spare.untyped_storage()._cdata) == 2 else None

    # -- eval cache -------------------------------------------------------------------------
    def _cached_forward(self, x: Tensor) -> Tensor:
        """Eval without a weight gradient: the weight operand of the current weights and
        settings, computed once (:meth:`cached_weight`)."""
        self._spare = None
        q, gamma, alpha, counts = self.cached_weight()
        x_ste = quantize_activations(x, self.act_quant, self.eps_beta, ste=self.act_ste)
        return self._finish(self._project(x_ste, q, self.bias), gamma, alpha, counts)

    def _cache_key(self) -> tuple[Any, ...] | None:
        """What the eval weight operand depends on: the version counters, storage, dtype,
        device and layout of W, scale_ema and forward_step (in-place updates such as optimizer
        steps and ``load_state_dict`` bump the counter, ``.to()`` moves the storage) and the
        quantizer settings. ``None`` (no cache) for tensors without version counters or storage
        (inference tensors, functorch or fake tensors)."""
        tensors = (self.weight_master, self.scale_ema, self.forward_step)
        try:
            layout = tuple((t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride())
                           for t in tensors)
        except (RuntimeError, NotImplementedError):
            return None
        return (*layout, self.alpha_override, self.alpha_target, self.alpha_min,
                self.warmup_steps, self.quant_mode, self.eps_gamma, self.ste_clip)

    def cached_weight(self) -> tuple[Tensor, Tensor, Tensor, LazyCounts | Tensor]:
        """``(gamma * w_ste, gamma, alpha, counts)`` of an eval forward (no gradient; the
        counts lazy), reused while :meth:`_cache_key` and the identity of the three tensors
        are unchanged. Never used in training mode, which drops it. Writes through ``.data``
        bypass the version counter: call :meth:`clear_weight_cache` after such a change."""
        key = self._cache_key()
        cache = self.__dict__.get("_weight_cache")
        tensors = (self.weight_master, self.scale_ema, self.forward_step)
        if cache is not None and key is not None and cache[0] == key:
            refs, entry = cache[1], cache[2]
            stale_inference = entry[0].is_inference() and not torch.is_inference_mode_enabled()
            if all(r() is t for r, t in zip(refs, tensors, strict=True)) and not stale_inference:
                return entry
        entry = self._eval_weight()
        self._weight_cache = None if key is None else (
            key, tuple(weakref.ref(t) for t in tensors), entry)
        return entry

    @torch.no_grad()
    def _eval_weight(self) -> tuple[Tensor, Tensor, Tensor, LazyCounts | Tensor]:
        w, alpha = self.weight_master.detach(), self.alpha_tensor()
        gamma, q = fast_weight_operand(
            w, self.scale_ema, alpha=alpha, update_ema=False, rho_s=self.rho_s,
            stat_mode=self.stat_mode, eps_gamma=self.eps_gamma, quant_mode=self.quant_mode,
            ste_clip=self.ste_clip)
        if q is not None:
            return q, gamma, alpha, LazyCounts(q)
        q, t = ste_weight(w, gamma, alpha, self.quant_mode, self.ste_clip)
        return q, gamma, alpha, ternary_counts(t)

    def clear_weight_cache(self) -> None:
        """Drop the cached eval weight operand (recomputed by the next eval forward)."""
        self._weight_cache = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_weight_cache"] = state["_spare"] = None  # copies and pickles recompute them
        return state

    def get_last_stats(self) -> dict[str, float] | None:
        """``{gamma, alpha, zero_ratio, plus_ratio, minus_ratio, effective_bits, num_weights}``
        of the last forward as Python numbers (``None`` before the first one); the forward
        keeps device tensors (the counts, or the weight operand to count lazily), converted
        only here."""
        if self._last_stats is None:
            return None
        gamma, alpha, counts = self._last_stats
        if isinstance(counts, LazyCounts):
            counts = counts.get()
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
