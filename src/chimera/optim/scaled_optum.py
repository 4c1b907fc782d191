"""``ScaledOptum``: integer-only training of ternary layers plus sign-SGD
(docs/algorithms.md#scaledoptum).

Float parameters: ``p -= lr * sign(grad)`` (no state; a parameter without gradient is untouched).

Integer-ternary modules (:mod:`chimera.nn.int_ternary`) registered with
``add_ternary_modules`` live in one extra *ternary param group* (no tensors; keys ``lr``
= ``ternary_lr``, ``threshold``, ``e_policy``, ``ternary=True``), so LR schedulers anneal the
ternary rate together with the float lr and ``state_dict()`` carries its hyper-parameters. Each
step, for every registered module that has ``dL/dW`` (g) from its last forward:

1. ``module.update_corr()``: per group ``corr_accum += sum(-sign(g) * T)``
(docs/algorithms.md#scaledoptum);
2. pressure increment (design choice): ``inc = -sign(g) * min(round(ternary_lr * |g| / mean|g|),
   threshold)`` (mean over the layer); then ``module.update_ternary(inc, threshold)``: the int8
   pressure moves ``T`` one step once ``|pressure| >= threshold``, then resets. Rounding filters
   gradients far below the layer mean, and ``ternary_lr -> 0`` (an annealing schedule) freezes T;
3. ``e_policy == "track"``: ``module.rebalance_exponent()`` (E follows the corr-derived scale);
   ``"fixed"`` keeps ``E`` as initialised, so ``corr_accum`` follows docs/algorithms.md#scaledoptum
   to the letter.

All integer state lives in module buffers, so it checkpoints with the model.

``fused``: True runs the step compiled by ``torch.compile`` (one graph per device for the
registered modules and the float groups: the same module methods and ``pressure_increment``,
and the sign-SGD as foreach ops, fused by inductor; triton on CUDA, C++ on CPU); False never
does; None (default) does only for groups on one CUDA device where torch.compile and triton are
usable (see ``chimera.optim._fused``). The float ``lr`` and ``ternary_lr`` enter the graph as
tensors, so a schedule recompiles nothing; the compiled step needs its tensors on one device per
group. Float parameters match the eager step bit for bit, and so does the integer state, with
one exception: ``mean|g|`` is a reduction whose summation order inductor may change, so where
``ternary_lr * |g| / mean|g|`` lies within float rounding of a half-integer, that pressure
increment can differ by one (the CPU tests pin exact equality on small layers).
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
_TERNARY_KEYS = ("lr", "threshold", "e_policy", "ternary")


def _check_group(group: dict[str, Any]) -> None:
    """``ValueError`` naming the first hyper-parameter of a float or ternary group outside its
    domain (the ternary group's ``lr`` is ``ternary_lr``)."""
    if group.get("ternary"):
        number("ternary_lr", group["lr"], 0)
        integer("threshold", group["threshold"], 1, MAX_THRESHOLD)
        choice("e_policy", group["e_policy"], E_POLICIES)
    else:
        number("lr", group["lr"], 0)
    check_fused(group.get("fused"))


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
    modules: list[IntTernaryModule], rate: float | Tensor, threshold: int, track: bool
) -> None:
    """Steps 1-3 of the module docstring for every module with ``dL/dW``, then release it."""
    for module in modules:
        grad = module.weight_grad
        if grad is None:
            continue
        module.update_corr()
        module.update_ternary(pressure_increment(grad, rate, threshold), threshold)
        if track:
            module.rebalance_exponent()
        module.release_weight_grad()


def _compiled_scaled_optum(
    float_groups: list[tuple[list[Tensor], list[Tensor]]],
    modules: list[IntTernaryModule],
    *scalars: Tensor,
    threshold: int,
    track: bool,
) -> None:
    """The step ``fused=True`` compiles for one device: sign-SGD ``p -= lr * sign(g)`` on every
    ``(params, grads)`` of ``float_groups`` with ``lr = scalars[i]``, then the integer update of
    ``modules`` with ``ternary_lr = scalars[-1]`` (0-dim float64 tensors, rounded to the
    tensors' dtype as the eager step rounds its Python floats)."""
    for (params, grads), lr in zip(float_groups, scalars[: len(float_groups)], strict=True):
        signs = [sign_keep_nan(g) for g in grads]
        foreach_add_(params, signs, lr.neg().to(params[0].dtype))
    if modules:
        _update_ternary_modules(modules, scalars[-1], threshold, track)


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
        *,
        fused: bool | None = None,
    ) -> None:
        _check_group(dict(lr=lr, fused=fused))
        integer("default_group_size", default_group_size, 1, 2**16)
        _check_group(dict(lr=ternary_lr, threshold=threshold, e_policy=e_policy, ternary=True))
        params = list(params)
        super().__init__(params or [{"params": []}], dict(lr=lr, fused=fused))
        self.default_group_size = default_group_size
        self._ternary_defaults = dict(
            lr=ternary_lr, threshold=threshold, e_policy=e_policy, ternary=True, fused=fused
        )
        self.ternary_modules: list[IntTernaryModule] = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyper-parameters are validated first."""
        _check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, after checking that ``state_dict`` is a ScaledOptum state for these
        groups (the ternary group where this optimizer has it, valid hyper-parameters, no
        per-parameter state), else ``ValueError``."""

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
            state_keys=lambda group: (),
        )
        super().load_state_dict(state_dict)

    @property
    def ternary_group(self) -> dict[str, Any] | None:
        """The ternary param group (None until a module is registered)."""
        return next((g for g in self.param_groups if g.get("ternary")), None)

    def add_ternary_modules(self, modules: Iterable[nn.Module]) -> None:
        """Register integer-ternary modules (each once); the first call adds the ternary group."""
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
        for module in modules:
            if not any(module is m for m in self.ternary_modules):
                self.ternary_modules.append(module)
        if self.ternary_modules and self.ternary_group is None:
            self.add_param_group({"params": [], **self._ternary_defaults})

    @classmethod
    def for_model(cls, model: nn.Module, **hparams: Any) -> ScaledOptum:
        """Register every int-ternary module of ``model``; every other trainable parameter
        (biases of the int-ternary modules included) is a float parameter."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = cls(params, **hparams)
        opt.add_ternary_modules(m for m in model.modules() if isinstance(m, IntTernaryModule))
        return opt

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
            _update_ternary_modules(modules, group["lr"], group["threshold"], track)
        for g, params in active:
            if params and use_fused(g["fused"], params):
                batches.setdefault(params[0].device, ([], []))[0].append((params, g["lr"]))
            else:
                for p in params:
                    p.add_(sign_keep_nan(p.grad), alpha=-g["lr"])
        for device, (float_groups, batch_modules) in batches.items():
            rates = [group["lr"]] if batch_modules else []
            run_compiled(
                _compiled_scaled_optum,
                [(params, [p.grad for p in params]) for params, _ in float_groups],
                batch_modules,
                key=[p for params, _ in float_groups for p in params] + batch_modules,
                device=device,
                scalars=[lr for _, lr in float_groups] + rates,
                threshold=group["threshold"] if batch_modules else 0,
                track=bool(batch_modules) and group["e_policy"] == "track",
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
