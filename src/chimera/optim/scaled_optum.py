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
``weight.grad`` (g, accumulated since ``zero_grad``) exists:

1. ``module.update_corr(g)``: per group ``corr_accum += sum(-sign(g) * T)``
(docs/algorithms.md#scaledoptum);
2. pressure increment (design choice): ``inc = -sign(g) * min(round(rate * |g| / mean|g|),
   threshold)`` (mean over the layer); then ``module.update_ternary(inc, threshold)``: the int8
   pressure moves ``T`` one step once ``|pressure| >= threshold``, then resets. Rounding filters
   gradients far below the layer mean, and ``rate -> 0`` (an annealing schedule) freezes T;
3. ``e_policy == "track"``: ``module.rebalance_exponent()`` (E follows the corr-derived scale);
   ``"fixed"`` keeps ``E`` as initialised, so ``corr_accum`` follows docs/algorithms.md#scaledoptum
   to the letter.

As in every torch optimizer, ``step`` does not clear gradients: a second ``step`` without
``zero_grad`` applies the same ``g`` again. All integer state lives in module buffers, so it
checkpoints with the model. Optimizer states saved before the ternary group held the weight
caches (0 parameters, no ``ternary_lr``) are rejected by ``load_state_dict`` (ValueError).

``fused``: True runs the step compiled by ``torch.compile`` (one graph per device for the
registered modules and the float groups: the same module methods and ``pressure_increment``,
and the sign-SGD as foreach ops, fused by inductor; triton on CUDA, C++ on CPU); False never
does; None (default) does only for groups on one CUDA device where torch.compile and triton are
usable (see ``chimera.optim._fused``). The per-group scalars enter the graph as tensors, so a
schedule recompiles nothing; the compiled step needs its tensors on one device per group. Float
parameters match the eager step bit for bit, and so does the integer state, with one exception:
``mean|g|`` is a reduction whose summation order inductor may change, so where
``rate * |g| / mean|g|`` lies within float rounding of a half-integer, that pressure increment
can differ by one (the CPU tests pin exact equality on small layers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from chimera._validate import choice, integer, number, require
from chimera.nn.int_ternary import MAX_THRESHOLD, IntTernaryModule
from chimera.optim._common import (
    FusableOptimizer,
    check_loaded_state,
    evaluate_closure,
    sign_keep_nan,
)
from chimera.optim._fused import check_fused, foreach_add_, run_compiled, use_fused

E_POLICIES = ("fixed", "track")
_TERNARY_KEYS = ("lr", "ternary_lr", "threshold", "e_policy", "ternary")
_FLOAT_DEFAULTS = {"momentum": 0.0, "momentum_decay": None, "weight_decay": 0.0,
                   "maximize": False}  # for older states


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
    check_fused(group.get("fused"))


def ternary_rate(group: dict[str, Any]) -> float:
    """The rate of the ternary group: ``ternary_lr * lr / max_lr`` (``max_lr``: OneCycleLR's
    peak stored in the group, else 1.0; module docstring)."""
    return group["ternary_lr"] * group["lr"] / group.get("max_lr", 1.0)


def pressure_increment(grad: Tensor, rate: float | Tensor, threshold: int) -> Tensor:
    """``-sign(g) * min(round(rate * |g| / mean|g|), threshold)`` as int16 (0 where g == 0).

    ``rate`` is a Python float or a 0-dim tensor (compiled step), cast to the gradient's dtype;
    ``rate / mean`` is computed as ``(1 / mean) * rate`` either way (torch's ``float / Tensor``).
    """
    mag = grad.abs()
    if isinstance(rate, Tensor):
        rate = rate.to(mag.dtype)
    scale = mag.mean().clamp_min(torch.finfo(mag.dtype).tiny).reciprocal() * rate
    units = torch.round(mag * scale)
    return (-torch.sign(grad) * units.clamp_(max=threshold)).to(torch.int16)


def _update_ternary_modules(
    modules: list[IntTernaryModule], rate: float | Tensor, threshold: int, track: bool,
    maximize: bool,
) -> None:
    """Steps 1-3 of the module docstring for every module with ``dL/dW``."""
    for module in modules:
        grad = module.weight_grad
        if grad is None:
            continue
        grad = -grad if maximize else grad
        module.update_corr(grad)
        module.update_ternary(pressure_increment(grad, rate, threshold), threshold)
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
    modules: list[IntTernaryModule],
    *scalars: Tensor,
    threshold: int,
    track: bool,
    maximize: bool,
) -> None:
    """The step ``fused=True`` compiles for one device: :func:`sign_sgd_` on every
    ``(params, grads, bufs)`` of ``float_groups`` with scalars ``scalars[4 i : 4 i + 4]``, then
    the integer update of ``modules`` with rate ``scalars[-1]`` (0-dim float64 tensors)."""
    for i, (params, grads, bufs) in enumerate(float_groups):
        sign_sgd_(params, grads, bufs, *scalars[4 * i: 4 * i + 4])
    if modules:
        _update_ternary_modules(modules, scalars[-1], threshold, track, maximize)


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
        fused: the compiled step (see the module docstring): True, False or None (automatic,
            CUDA only). Stored in every param group, the ternary group included.
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
        fused: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, momentum_decay=momentum_decay,
                        weight_decay=weight_decay, maximize=maximize, fused=fused)
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
        batches: dict[torch.device, tuple[list, list]] = {}  # device -> (float groups, modules)
        group, modules = self.ternary_group, self.ternary_modules
        if modules and use_fused(group["fused"], [m.T for m in modules]):
            batches[modules[0].T.device] = ([], modules)
        elif modules:
            track = group["e_policy"] == "track"
            _update_ternary_modules(modules, ternary_rate(group), group["threshold"], track,
                                    group["maximize"])
        for g, params in active:
            if g.get("ternary") or not params:
                continue
            grads, bufs = [p.grad for p in params], self._momentum_buffers(g, params)
            if use_fused(g["fused"], params):
                batches.setdefault(params[0].device, ([], []))[0].append((params, grads, bufs, g))
            else:
                sign_sgd_(params, grads, bufs, *_float_scalars(g))
        for device, (float_groups, batch_modules) in batches.items():
            run_compiled(
                _compiled_scaled_optum,
                [(params, grads, bufs) for params, grads, bufs, _ in float_groups],
                batch_modules,
                key=[p for params, *_ in float_groups for p in params] + batch_modules,
                device=device,
                scalars=[x for *_, g in float_groups for x in _float_scalars(g)]
                + ([ternary_rate(group)] if batch_modules else []),
                threshold=group["threshold"] if batch_modules else 0,
                track=bool(batch_modules) and group["e_policy"] == "track",
                maximize=bool(batch_modules) and group["maximize"],
            )
        return loss

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
