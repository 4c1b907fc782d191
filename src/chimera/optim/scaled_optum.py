"""``ScaledOptum``: integer-only training of ternary layers plus sign-SGD
(docs/algorithms.md#scaledoptum).

Float parameters (decoupled weight decay, optional momentum on the sign, ``maximize`` as in
torch's optimizers); ``c = momentum`` while ``momentum_decay`` is None (heavy-ball Signum, ``d``
is the new buffer), else ``c = momentum * (1 - momentum_decay) / (1 - momentum)``::

    g <- -g if maximize;   p <- p * (1 - lr * weight_decay)
    d = g                            (momentum == 0: no state)
    d = c * buf + g;  buf <- decay * buf + g
                                     (momentum > 0: state "sign_momentum", zeros at first;
                                      decay = momentum_decay, or momentum while it is None)
    p <- p - lr * sign(d)            (a parameter without gradient is untouched)

With ``buf = m / (1 - b2)`` and ``(momentum, momentum_decay) = (b1, b2)`` this is Lion's update
``sign(b1 m + (1 - b1) g)``, ``m <- b2 m + (1 - b2) g`` (d is scaled by ``1 / (1 - b1)``,
which the sign ignores); with ``b2 = b1`` it is heavy-ball Signum. The MNIST-1D recipe
(``docs/int_ternary.md``) uses (0.9, 0.99).

Integer-ternary modules (:mod:`chimera.nn.int_ternary`) registered with
``add_ternary_modules`` live in one extra *ternary param group* whose ``params`` are their
``weight`` caches (so ``zero_grad`` clears ``dL/dW`` and DDP all-reduces it); nothing in this
group is ever updated by float math. Its keys: ``ternary_lr`` (the rate; schedulers never touch
it), ``lr`` (a *multiplier* of ``ternary_lr``, 1.0 at start: a relative scheduler such as
cosine or ``LambdaLR`` anneals it with the float lr), ``threshold``, ``e_policy``,
``ternary=True``. The rate a step uses is ``ternary_lr * lr / max_lr`` where ``max_lr`` is the
peak that ``OneCycleLR`` (which writes absolute lrs into every group) stores in the group, 1.0
otherwise; so OneCycleLR warms the ternary rate up to ``ternary_lr`` and anneals it, instead of
setting it to a float-sized lr. ``weight_decay`` and ``momentum`` do nothing to ternary weights
(``T`` has no magnitude to decay; the pressure counter already integrates the gradient);
``maximize`` negates their gradient too. Each step, for every registered module whose
``weight.grad`` (g, accumulated since ``zero_grad``; non-finite entries read as 0) exists:

1. ``module.update_corr(g)``: per group ``corr_accum += sum(-sign(g) * T)``
(docs/algorithms.md#scaledoptum);
2. pressure increment (design choice): ``inc = -sign(g) * min(round(|g| * scale), threshold)``
   with ``scale = min(rate / max(mean|g|, tiny), float32 max)`` (mean over the layer:
   :func:`gradient_scales`); then ``module.update_ternary(inc, threshold)``:
   the int8 pressure moves ``T`` one step once ``|pressure| >= threshold``, then resets.
   Rounding filters gradients far below the layer mean, and ``rate -> 0`` (an annealing
   schedule) freezes T;
3. ``e_policy == "track"``: ``module.rebalance_exponent()`` (E follows the corr-derived scale);
   ``"fixed"`` keeps ``E`` as initialised, so ``corr_accum`` follows docs/algorithms.md#scaledoptum
   to the letter.

As in every torch optimizer, ``step`` does not clear gradients: a second ``step`` without
``zero_grad`` applies the same ``g`` again. All integer state lives in module buffers, so it
checkpoints with the model. Optimizer states saved before the ternary group held the weight
caches (0 parameters, no ``ternary_lr``) are rejected by ``load_state_dict`` (ValueError).

Paths of the integer update, equal bit for bit (integer state and ``weight`` cache):

- ``foreach=False``: the for-loop ground truth, steps 1-3 by the module's own methods;
- default eager (``foreach`` None or True): :func:`ternary_step_` per module, about a dozen
  ops on views grouped as (out, groups, gs) (no padded copies; a partial last group is a
  slice), ``nan_to_num`` only for a gradient whose sum |g| is not finite, the ``weight``
  cache written once;
- compiled (``fused=True``): :func:`ternary_step_` of every module in one ``torch.compile``
  graph per device, with the float groups' sign-SGD (foreach ops); inductor makes two passes
  over each weight (the per-group corr sums, then one elementwise kernel writing pressure,
  ``T`` and the weight cache). Bytes per ternary weight: g read three times (sum |g|,
  both passes), T twice, pressure once, T, pressure and the fp32 cache written: ~23 B.
  ``fused=None`` (default) compiles on one CUDA device where ``use_fused`` allows
  (``chimera.optim._fused``), and on CPU from ``CPU_MIN_NUMEL`` (2^20) registered ternary
  weights on where inductor builds C++ (the first step compiles: ~5-15 s for one
  layer, ~1 min for GPT-2 small's 49 matrices; inductor's on-disk cache keeps the kernels
  across processes); smaller models (ResNet-20's 0.27M, tests) stay eager. ``fused=False``
  never compiles.

Every path takes ``mean|g|`` from :func:`gradient_scales` (eager, chunked ``abs`` + ``sum``: a
reduction inside the compiled graph would sum in another order and move half-integer
roundings); every
other operation is exact (signs, small integers in float32, integer sums). The per-group
scalars enter the graph as tensors, so a schedule recompiles nothing; the compiled step needs
its tensors on one device per group, and a module whose buffers are not contiguous (e.g.
channels_last) is updated eagerly. Float parameters match the eager step bit for bit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from chimera._validate import choice, integer, number, require
from chimera.nn.int_ternary import (
    MAX_THRESHOLD,
    IntTernaryModule,
    group_scale,
    group_sums,
    rebalance_exponent_,
    scale_groups,
)
from chimera.optim._common import (
    FusableOptimizer,
    check_loaded_state,
    evaluate_closure,
    sign_keep_nan,
)
from chimera.optim._fused import (
    check_fused,
    foreach_add_,
    run_compiled,
    use_fused,
    worth_compiling_on_cpu,
)

E_POLICIES = ("fixed", "track")
_TERNARY_KEYS = ("lr", "ternary_lr", "threshold", "e_policy", "ternary")
_FLOAT_DEFAULTS = {"momentum": 0.0, "momentum_decay": None, "weight_decay": 0.0,
                   "maximize": False, "foreach": None}  # for older states
_TINY = torch.finfo(torch.float32).tiny
_CHUNK = 2**16  # elements per abs + sum of abs_sums (256 KiB of fp32: stays in L2)
_EAGER_BLOCK = 2**16  # weights per block of the eager step
_FLOAT_MAX = torch.finfo(torch.float32).max


def _check_group(group: dict[str, Any]) -> None:
    """``ValueError`` naming the first hyper-parameter of a float or ternary group outside its
    domain."""
    number("lr", group["lr"], 0)
    number("momentum", group.get("momentum", 0.0), 0, 1, high_open=True)
    if group.get("momentum_decay") is not None:
        number("momentum_decay", group["momentum_decay"], 0, 1, high_open=True)
    number("weight_decay", group.get("weight_decay", 0.0), 0)
    maximize = group.get("maximize", False)
    require(isinstance(maximize, bool), "maximize", maximize, "True or False")
    if group.get("ternary"):
        number("ternary_lr", group["ternary_lr"], 0)
        integer("threshold", group["threshold"], 1, MAX_THRESHOLD)
        choice("e_policy", group["e_policy"], E_POLICIES)
    check_fused(group.get("fused"), group.get("foreach"))


def ternary_rate(group: dict[str, Any]) -> float:
    """The rate of the ternary group: ``ternary_lr * lr / max_lr`` (``max_lr``: OneCycleLR's
    peak stored in the group, else 1.0; module docstring)."""
    return group["ternary_lr"] * group["lr"] / group.get("max_lr", 1.0)


def abs_sums(grads: list[Tensor]) -> Tensor:
    """``sum |g|`` per gradient as a float32 vector: torch's 1-norm (one foreach call) for
    gradients of at most ``_CHUNK`` elements; for larger ones, per chunk of ``_CHUNK``
    elements ``abs`` into a cache-sized scratch and ``sum``, then the sum of the chunk sums
    (the 1-norm is a scalar loop, several times slower than these two vectorized ops)."""
    small = [i for i, g in enumerate(grads) if g.numel() <= _CHUNK]
    sums: list[Tensor | None] = [None] * len(grads)
    norms = torch._foreach_norm([grads[i] for i in small], 1, dtype=torch.float32) if small else []
    for i, value in zip(small, norms, strict=True):
        sums[i] = value
    for i, grad in enumerate(grads):
        if sums[i] is None:
            flat = grad.reshape(-1)
            scratch = torch.empty(_CHUNK, dtype=flat.dtype, device=flat.device)
            sums[i] = torch.stack([
                torch.abs(chunk, out=scratch[: chunk.numel()]).sum(dtype=torch.float32)
                for chunk in flat.split(_CHUNK)]).sum()
    return torch.stack(sums)


def gradient_scales(grads: list[Tensor], rate: float) -> tuple[list[Tensor], Tensor]:
    """The gradients with non-finite entries read as 0 (a cleaned copy only of a gradient that
    has one) and, per gradient, ``min(rate / max(mean|g|, tiny), float32 max)`` as a float32
    vector, ``mean|g| = abs_sums(g) / numel``. Every path of the step computes its scales
    here, so they agree bit for bit. One host sync (the finiteness check)."""
    norms = abs_sums(grads)
    if not bool(torch.isfinite(norms).all()):
        grads = [g if bool(torch.isfinite(n)) else
                 torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                 for g, n in zip(grads, norms, strict=True)]
        norms = abs_sums(grads)
    numels = torch.tensor([g.numel() for g in grads], dtype=torch.float32, device=norms.device)
    means = (norms / numels).clamp_min(_TINY)
    return grads, means.reciprocal().mul(rate).clamp_max(_FLOAT_MAX)


def increment(grad: Tensor, scale: Tensor, threshold: int) -> Tensor:
    """``clamp(round(g * scale), -threshold, threshold)`` in float32 (``scale``: a 0-dim float32
    tensor, negative when descending): ``-sign(g) * min(round(|g| * |scale|), threshold)`` with
    the sign of the direction, since rounding is symmetric."""
    return torch.mul(grad.float(), scale).round_().clamp_(-threshold, threshold)


def pressure_increment(grad: Tensor, rate: float, threshold: int) -> Tensor:
    """``-sign(g) * min(round(rate * |g| / mean|g|), threshold)`` as int16 (0 where g == 0;
    non-finite entries of ``grad`` read as 0; :func:`gradient_scales`)."""
    (grad,), scales = gradient_scales([grad], rate)
    return increment(grad, -scales[0], threshold).to(torch.int16)


def ternary_step_(
    grad: Tensor,
    scale: Tensor,
    T: Tensor,
    pressure: Tensor,
    corr_accum: Tensor,
    E: Tensor,
    step: Tensor,
    weight: Tensor,
    *,
    threshold: int,
    group_size: int,
    track: bool,
    maximize: bool,
) -> None:
    """Steps 1-3 of the module docstring on one module's tensors, in place. ``T``,
    ``pressure``, ``weight`` (and ``grad``, finite) come in the working shape of
    :func:`work_views`; ``scale`` is the gradient's signed 0-dim scale (``-``
    :func:`gradient_scales`, ``+`` when maximizing). Compiled, this is two passes over the
    weights (the corr sums, then the elementwise update writing ``pressure``, ``T`` and the
    ``weight`` cache); eager, a dozen ops. The float arithmetic is exact: signs, small
    integers, and ``|pressure + increment| < 2 threshold`` for a pressure left by this
    threshold."""
    g = grad.float()
    score = group_sums(torch.sign(g).mul_(T), group_size)  # small integers: exact in float32
    corr_accum.add_(score.to(torch.int64), alpha=1 if maximize else -1)
    step.add_(1)
    if track:
        rebalance_exponent_(E, corr_accum, step, group_size)
    p = torch.mul(g, scale).round_().clamp_(-threshold, threshold).add_(pressure)
    move = _move(p, threshold)
    pressure.copy_(p.mul_(move == 0))
    t = move.add_(T).clamp_(-1, 1)
    T.copy_(t)
    weight.copy_(scale_groups(t, group_scale(E, corr_accum, step, group_size, bits=True),
                              group_size))


def _move(p: Tensor, threshold: int) -> Tensor:
    """``sign(p)`` where ``|p| >= threshold``, else 0 (float): ``trunc(p / threshold)``
    clamped to [-1, 1] in eager (two ops; exact, and the clamp covers a pressure left by a
    larger threshold), comparisons when compiled (no vector division)."""
    if torch.compiler.is_compiling():
        return (p >= threshold).to(p.dtype) - (p <= -threshold).to(p.dtype)
    return torch.div(p, threshold, rounding_mode="trunc").clamp_(-1, 1)


def work_views(module: IntTernaryModule, grad: Tensor) -> tuple[Tensor, ...] | None:
    """``(grad, T, pressure, weight)`` viewed as (out, groups, gs) where ``gs`` divides the
    fan-in (every elementwise op then shares the corr sums' loop), else as (out, fan_in);
    None where a buffer is not contiguous (no view writes through). The buffer views are
    cached per module while they still view its tensors' current storage."""
    tensors = (module.T, module.pressure, module.weight)
    cached = _VIEWS.get(module)
    if cached is None or not all(src is t and v.data_ptr() == t.data_ptr()
                                 for src, v, t in zip(*cached, tensors, strict=True)):
        out, fan_in, size = module.T.shape[0], module.fan_in, module.group_size
        shape = (out, fan_in) if fan_in % size else (out, fan_in // size, size)
        if not all(t.is_contiguous() for t in tensors):
            return None
        # views of detached aliases: no autograd view metadata on the weight's view
        cached = _VIEWS[module] = (tensors, tuple(t.detach().view(shape) for t in tensors))
    views = cached[1]
    return (grad.view(views[0].shape) if grad.is_contiguous() else grad.reshape(views[0].shape),
            *views)


_VIEWS: weakref.WeakKeyDictionary[IntTernaryModule, tuple[tuple[Tensor, ...], ...]] = (
    weakref.WeakKeyDictionary())


def _step_module_(module: IntTernaryModule, grad: Tensor, scale: Tensor, **static: Any) -> None:
    """:func:`ternary_step_` on ``module`` in blocks of rows (each row's update is its own:
    exact), through contiguous copies where its buffers are not contiguous (e.g. a
    channels_last conv)."""
    views = work_views(module, grad)
    if views is not None:
        tensors = (*views, module.corr_accum, module.E)
        rows = max(1, _EAGER_BLOCK // module.fan_in)  # rows per block: temporaries stay cached
        for start in range(0, module.T.shape[0], rows):
            g, T, pressure, weight, corr, E = (t[start: start + rows] for t in tensors)
            step = module.step.clone()  # every block counts from the same step
            ternary_step_(g, scale, T, pressure, corr, E, step, weight,
                          group_size=module.group_size, **static)
        module.step.add_(1)
        return
    rows = (module.T.shape[0], module.fan_in)
    T, pressure, weight = (t.reshape(rows).contiguous() for t in (
        module.T, module.pressure, module.weight))
    ternary_step_(grad.reshape(rows), scale, T, pressure, module.corr_accum, module.E,
                  module.step, weight, group_size=module.group_size, **static)
    for buffer, value in ((module.T, T), (module.pressure, pressure), (module.weight, weight)):
        buffer.copy_(value.view(buffer.shape))


def _ternary_inputs(
    modules: list[IntTernaryModule], rate: float, maximize: bool
) -> tuple[list[IntTernaryModule], list[Tensor], Tensor]:
    """The modules with ``dL/dW``, their finite gradients and signed scales (one device)."""
    active = [m for m in modules if m.weight.grad is not None]
    if not active:
        return [], [], torch.empty(0)
    grads, scales = gradient_scales([m.weight.grad for m in active], rate)
    return active, grads, scales if maximize else scales.neg()


def _update_ternary_modules(
    modules: list[IntTernaryModule], grads: list[Tensor], scales: Tensor, threshold: int,
    track: bool, maximize: bool, *, reference: bool = False,
) -> None:
    """Steps 1-3 of the module docstring for every module (each with its ``dL/dW``):
    :func:`ternary_step_`, or, with ``reference``, the module's own methods one by one (the
    ground truth the fast path matches bit for bit)."""
    for module, grad, scale in zip(modules, grads, scales, strict=True):
        if not reference:
            _step_module_(module, grad, scale, threshold=threshold, track=track,
                          maximize=maximize)
            continue
        module.update_corr(-grad if maximize else grad)
        module.update_ternary(increment(grad, scale, threshold).to(torch.int16), threshold)
        if track:
            module.rebalance_exponent()


def sign_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    step: float | Tensor,
    keep: float | Tensor,
    lookahead: float | Tensor,
    decay: float | Tensor,
) -> None:
    """``p <- keep * p + step * sign(d)`` with ``d = g``, or, with momentum buffers,
    ``d = lookahead * buf + g`` and ``buf <- decay * buf + g`` (``step = -lr``, ``+lr`` when
    maximizing; ``keep = 1 - lr * weight_decay``; module docstring). Scalars are Python floats
    (eager) or 0-dim tensors (compiled), rounded to the parameters' dtype either way."""
    if isinstance(step, Tensor):
        step, keep, lookahead, decay = (t.to(params[0].dtype)
                                        for t in (step, keep, lookahead, decay))
    if bufs:
        directions = torch._foreach_add(torch._foreach_mul(bufs, lookahead), grads)
        torch._foreach_mul_(bufs, decay)
        torch._foreach_add_(bufs, grads)
        grads = directions
    if isinstance(keep, Tensor) or keep != 1.0:
        torch._foreach_mul_(params, keep)
    foreach_add_(params, [sign_keep_nan(d) for d in grads], step)


def _float_scalars(group: dict[str, Any]) -> tuple[float, float, float, float]:
    """``(step, keep, lookahead, decay)`` of :func:`sign_sgd_` for a float group."""
    lr, momentum, decay = group["lr"], group["momentum"], group["momentum_decay"]
    lookahead = momentum if decay is None else momentum * (1 - decay) / (1 - momentum)
    return ((lr if group["maximize"] else -lr), 1.0 - lr * group["weight_decay"], lookahead,
            momentum if decay is None else decay)


def _compiled_scaled_optum(
    float_groups: list[tuple[list[Tensor], list[Tensor], list[Tensor]]],
    ternary: tuple[Tensor, list[tuple[Tensor, ...]]] | None,
    *scalars: Tensor,
    threshold: int,
    group_sizes: tuple[int, ...],
    track: bool,
    maximize: bool,
) -> None:
    """The step ``fused=True`` compiles for one device: :func:`sign_sgd_` on every
    ``(params, grads, bufs)`` of ``float_groups`` with scalars ``scalars[4 i : 4 i + 4]``
    (0-dim float64 tensors), then :func:`ternary_step_` on every module of ``ternary``
    (``(scales, per module (grad, T, pressure, corr_accum, E, step, weight))`` in the shapes
    of :func:`work_views`; ``group_sizes`` per module)."""
    for i, (params, grads, bufs) in enumerate(float_groups):
        sign_sgd_(params, grads, bufs, *scalars[4 * i: 4 * i + 4])
    if ternary is not None:
        scales, tensors = ternary
        for i, (grad, T, pressure, corr_accum, E, step, weight) in enumerate(tensors):
            ternary_step_(grad, scales[i], T, pressure, corr_accum, E, step, weight,
                          threshold=threshold, group_size=group_sizes[i], track=track,
                          maximize=maximize)


def _compile_ternary(group: dict[str, Any], modules: list[IntTernaryModule]) -> bool:
    """Whether the integer update of ``modules`` (one device) runs compiled: ``fused`` (and
    ``foreach``) when given; for None, as ``use_fused`` decides, on CPU from
    ``CPU_MIN_NUMEL`` ternary weights (``chimera.optim._fused``; the compiled step saves ~6 ns
    per weight against the eager one on x86, which repays a compile of 5-60 s within thousands
    of steps)."""
    if not modules:
        return False
    tensors = [m.T for m in modules]
    return use_fused(group["fused"], tensors, group["foreach"],
                     cpu=worth_compiling_on_cpu(tensors))


class ScaledOptum(FusableOptimizer):
    """Integer-state training of int-ternary modules and sign-SGD for float parameters.

    Args:
        params: the ordinary float parameters (may be empty).
        lr: sign-SGD step of the float parameters (>= 0).
        default_group_size: the group size every registered module must use, in [1, 2^16].
        threshold: pressure at which ``T`` moves one step, in [1, 127].
        ternary_lr: scale of the pressure increments (>= 0); a mean-sized gradient adds
            ``round(ternary_lr)``, so ``threshold / ternary_lr`` steps move such a weight.
        e_policy: ``"fixed"`` (E as initialised) or ``"track"`` (E follows the corr scale).
        momentum: momentum of the float parameters' sign step, in [0, 1) (Lion's beta1); it
            also lets ``OneCycleLR(cycle_momentum=True)`` cycle it.
        momentum_decay: decay of the momentum buffer, in [0, 1) (Lion's beta2), or None
            (default: ``momentum``, heavy-ball Signum). See the module docstring.
        weight_decay: decoupled decay ``p <- p * (1 - lr * weight_decay)`` of the float
            parameters (>= 0); none on ternary weights.
        maximize: ascend instead of descend (float and ternary weights alike).
        foreach: False runs the for-loop ground truth of the integer update (the modules'
            own methods); None or True the default eager step (module docstring). The float
            sign-SGD is the same foreach step either way.
        fused: the compiled step (module docstring): True, False or None (automatic: CUDA,
            or CPU from ``CPU_MIN_NUMEL`` ternary weights). ``foreach`` and ``fused``
            are stored in every param group, the ternary group included.
    """

    _PICKLED_ATTRIBUTES = ("default_group_size", "_ternary_defaults", "ternary_modules")

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.3,
        default_group_size: int = 32,
        threshold: int = 64,
        ternary_lr: float = 8.0,
        e_policy: str = "fixed",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        momentum_decay: float | None = None,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, momentum_decay=momentum_decay,
                        weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        fused=fused)
        _check_group(defaults)
        integer("default_group_size", default_group_size, 1, 2**16)
        ternary = dict(lr=1.0, ternary_lr=ternary_lr, threshold=threshold, e_policy=e_policy,
                       ternary=True)
        _check_group({**defaults, **ternary})
        params = list(params)
        super().__init__(params or [{"params": []}], defaults)
        self.default_group_size = default_group_size
        self._ternary_defaults = ternary
        self.ternary_modules: list[IntTernaryModule] = []

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _FLOAT_DEFAULTS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyper-parameters are validated first."""
        _check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, after checking that ``state_dict`` is a ScaledOptum state for these
        groups (the ternary group where this optimizer has it, valid hyper-parameters, momentum
        buffers of the parameters' shapes), else ``ValueError``."""

        def check_group(saved: dict[str, Any], group: dict[str, Any]) -> None:
            kind = "the ternary group" if group.get("ternary") else "a float group"
            require(bool(saved.get("ternary")) == bool(group.get("ternary")), "ternary",
                    saved.get("ternary"), f"{bool(group.get('ternary'))} (this is {kind})")
            _check_group(saved)

        check_loaded_state(
            self,
            state_dict,
            group_keys=lambda group: _TERNARY_KEYS if group.get("ternary") else ("lr",),
            check_group=check_group,
            state_keys=lambda group: () if group.get("ternary") else ("sign_momentum",),
        )
        super().load_state_dict(state_dict)

    @property
    def ternary_group(self) -> dict[str, Any] | None:
        """The ternary param group (None until a module is registered)."""
        return next((g for g in self.param_groups if g.get("ternary")), None)

    def add_ternary_modules(self, modules: Iterable[nn.Module]) -> None:
        """Register integer-ternary modules (each once): their ``weight`` caches leave any float
        group and join the ternary group, which the first call adds."""
        modules = list(modules)
        for module in modules:
            if not isinstance(module, IntTernaryModule):
                raise ValueError(
                    f"modules must be integer-ternary modules, got {type(module).__name__}"
                )
            if module.group_size != self.default_group_size:
                raise ValueError(
                    f"module group_size {module.group_size} differs from default_group_size "
                    f"{self.default_group_size}"
                )
        new = []
        for module in modules:
            if not any(module is m for m in [*self.ternary_modules, *new]):
                new.append(module)
        weights = {id(m.weight) for m in new}
        for group in self.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in weights]
        self.ternary_modules += new
        if self.ternary_group is None and new:
            self.add_param_group({"params": [m.weight for m in new], **self._ternary_defaults})
        elif new:
            self.ternary_group["params"] += [m.weight for m in new]

    @classmethod
    def for_model(cls, model: nn.Module, **hparams: Any) -> ScaledOptum:
        """Register every int-ternary module of ``model``; every other trainable parameter
        (biases of the int-ternary modules included) is a float parameter."""
        modules = [m for m in model.modules() if isinstance(m, IntTernaryModule)]
        weights = {id(m.weight) for m in modules}
        opt = cls([p for p in model.parameters() if p.requires_grad and id(p) not in weights],
                  **hparams)
        opt.add_ternary_modules(modules)
        return opt

    def _momentum_buffers(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """The momentum buffers of ``params`` (created as zeros, so the first ``d`` is ``g``);
        none while the group's momentum is 0."""
        if group["momentum"] == 0:
            return []
        return [self.state[p].setdefault("sign_momentum", torch.zeros_like(p))
                for p in params]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One integer update of every registered module and a sign-SGD step of the floats."""
        loss = evaluate_closure(closure)
        active = self._groups_with_grads()
        batches: dict[torch.device, tuple[list, Any]] = {}  # device -> (float groups, ternary)
        group = self.ternary_group
        if group is not None:
            self._ternary_step(group, batches)
        for g, params in active:
            if g.get("ternary") or not params:
                continue
            grads, bufs = [p.grad for p in params], self._momentum_buffers(g, params)
            if use_fused(g["fused"], params, g["foreach"]):
                batches.setdefault(params[0].device, ([], None))[0].append(
                    (params, grads, bufs, g))
            else:
                sign_sgd_(params, grads, bufs, *_float_scalars(g))
        for device, (float_groups, ternary) in batches.items():
            modules, tensors, scales = ternary or ([], [], None)
            run_compiled(
                _compiled_scaled_optum,
                [(params, grads, bufs) for params, grads, bufs, _ in float_groups],
                (scales, tensors) if ternary else None,
                key=[p for params, *_ in float_groups for p in params] + modules,
                device=device,
                scalars=[x for *_, g in float_groups for x in _float_scalars(g)],
                threshold=group["threshold"] if ternary else 0,
                group_sizes=tuple(m.group_size for m in modules),
                track=bool(ternary) and group["e_policy"] == "track",
                maximize=bool(ternary) and group["maximize"],
            )
        return loss

    def _ternary_step(self, group: dict[str, Any], batches: dict[torch.device, tuple]) -> None:
        """The integer update of every registered module with ``dL/dW``: now (eager) or, per
        device, queued in ``batches`` for the compiled step."""
        by_device: dict[torch.device, list[IntTernaryModule]] = {}
        for module in self.ternary_modules:
            if module.weight.grad is not None:
                by_device.setdefault(module.T.device, []).append(module)
        for device, modules in by_device.items():
            modules, grads, scales = _ternary_inputs(modules, ternary_rate(group),
                                                     group["maximize"])
            static = {"threshold": group["threshold"], "track": group["e_policy"] == "track",
                      "maximize": group["maximize"]}
            if _compile_ternary(group, modules):
                batch = self._compiled_batch(modules, grads, scales, static)
                if batch[0]:
                    batches[device] = ([], batch)
                continue
            _update_ternary_modules(modules, grads, scales, **static,
                                    reference=group["foreach"] is False)

    @staticmethod
    def _compiled_batch(modules: list[IntTernaryModule], grads: list[Tensor], scales: Tensor,
                        static: dict[str, Any]) -> tuple[list, list, Tensor]:
        """``(modules, their tensors, scales)`` for the compiled step; a module whose buffers
        are not contiguous is updated now, eagerly."""
        batch = ([], [], [])
        for module, grad, scale in zip(modules, grads, scales, strict=True):
            views = work_views(module, grad)
            if views is None:
                _step_module_(module, grad, scale, **static)
                continue
            g, T, pressure, weight = views
            batch[0].append(module)
            batch[1].append((g, T, pressure, module.corr_accum, module.E, module.step, weight))
            batch[2].append(scale)
        return batch[0], batch[1], scales if len(batch[2]) == len(scales) else torch.stack(
            batch[2] or [scales.new_zeros(())])

    def run_metrics(self) -> dict[str, float]:
        """What a training run records about this optimizer beyond its state bytes."""
        return {"ternary_state_bytes_per_weight": scaled_optum_state_bytes_per_weight(self)}


def scaled_optum_state_bytes_per_weight(opt: ScaledOptum) -> float:
    """Integer training-state bytes (pressure, corr_accum, E, step of every registered module)
    per ternary weight; float parameters carry no state. 0.0 without ternary modules."""
    weights = sum(m.T.numel() for m in opt.ternary_modules)
    if weights == 0:
        return 0.0
    return sum(m.state_bytes() for m in opt.ternary_modules) / weights
