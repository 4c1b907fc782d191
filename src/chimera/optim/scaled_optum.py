"""``ScaledOptum``: integer-only training of ternary layers plus sign-SGD (SPEC 1.3).

Float parameters: ``p -= lr * sign(grad)`` (no state; a parameter without gradient is untouched).

Integer-ternary modules (:mod:`chimera.nn.int_ternary`) registered with
``add_ternary_modules`` live in one extra *ternary param group* (no tensors; keys ``lr``
= ``ternary_lr``, ``threshold``, ``e_policy``, ``ternary=True``), so LR schedulers anneal the
ternary rate together with the float lr and ``state_dict()`` carries its hyper-parameters. Each
step, for every registered module that has ``dL/dW`` (g) from its last forward:

1. ``module.update_corr()``: per group ``corr_accum += sum(-sign(g) * T)`` (SPEC 1.3);
2. pressure increment (design choice): ``inc = -sign(g) * min(round(ternary_lr * |g| / mean|g|),
   threshold)`` (mean over the layer); then ``module.update_ternary(inc, threshold)``: the int8
   pressure moves ``T`` one step once ``|pressure| >= threshold``, then resets. Rounding filters
   gradients far below the layer mean, and ``ternary_lr -> 0`` (an annealing schedule) freezes T;
3. ``e_policy == "track"``: ``module.rebalance_exponent()`` (E follows the corr-derived scale);
   ``"fixed"`` keeps ``E`` as initialised, so ``corr_accum`` follows SPEC to the letter.

All integer state lives in module buffers, so it checkpoints with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from chimera.nn.int_ternary import MAX_THRESHOLD, IntTernaryModule
from chimera.optim._common import evaluate_closure, sign_keep_nan

E_POLICIES = ("fixed", "track")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: an integer in [{low}, {high}])")


def pressure_increment(grad: Tensor, rate: float, threshold: int) -> Tensor:
    """``-sign(g) * min(round(rate * |g| / mean|g|), threshold)`` as int16 (0 where g == 0)."""
    mag = grad.abs()
    units = torch.round(mag * (rate / mag.mean().clamp_min(torch.finfo(mag.dtype).tiny)))
    return (-torch.sign(grad) * units.clamp_(max=threshold)).to(torch.int16)


class ScaledOptum(torch.optim.Optimizer):
    """Integer-state training of int-ternary modules and sign-SGD for float parameters.

    Args:
        params: the ordinary float parameters (may be empty).
        lr: sign-SGD step of the float parameters (>= 0).
        default_group_size: the group size every registered module must use, in [1, 2^16].
        threshold: pressure at which ``T`` moves one step, in [1, 127].
        ternary_lr: scale of the pressure increments (>= 0); a mean-sized gradient adds
            ``round(ternary_lr)``, so ``threshold / ternary_lr`` steps move such a weight.
        e_policy: ``"fixed"`` (E as initialised) or ``"track"`` (E follows the corr scale).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.3,
        default_group_size: int = 32,
        threshold: int = 64,
        ternary_lr: float = 8.0,
        e_policy: str = "fixed",
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"Invalid lr: {lr} (allowed: >= 0)")
        _check_int("default_group_size", default_group_size, 1, 2**16)
        _check_int("threshold", threshold, 1, MAX_THRESHOLD)
        if not ternary_lr >= 0:
            raise ValueError(f"Invalid ternary_lr: {ternary_lr} (allowed: >= 0)")
        if e_policy not in E_POLICIES:
            raise ValueError(f"Invalid e_policy: {e_policy!r} (allowed: {E_POLICIES})")
        params = list(params)
        super().__init__(params or [{"params": []}], dict(lr=lr))
        self.default_group_size = default_group_size
        self._ternary_defaults = dict(
            lr=ternary_lr, threshold=threshold, e_policy=e_policy, ternary=True
        )
        self.ternary_modules: list[IntTernaryModule] = []

    def __getstate__(self) -> dict[str, Any]:  # torch keeps only defaults/state/param_groups
        extra = ("default_group_size", "_ternary_defaults", "ternary_modules")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in extra}}

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
        floats = [(p, g["lr"]) for g in self.param_groups for p in g["params"]
                  if p.grad is not None]
        if any(p.grad.is_sparse for p, _ in floats):
            raise RuntimeError("ScaledOptum does not support sparse gradients")
        group = self.ternary_group
        for module in self.ternary_modules:
            grad = module.weight_grad
            if grad is None:
                continue
            module.update_corr()
            inc = pressure_increment(grad, group["lr"], group["threshold"])
            module.update_ternary(inc, group["threshold"])
            if group["e_policy"] == "track":
                module.rebalance_exponent()
            module.release_weight_grad()
        for p, lr in floats:
            p.add_(sign_keep_nan(p.grad), alpha=-lr)
        return loss


def scaled_optum_state_bytes_per_weight(opt: ScaledOptum) -> float:
    """Integer training-state bytes (pressure, corr_accum, E, step of every registered module)
    per ternary weight; float parameters carry no state. 0.0 without ternary modules."""
    weights = sum(m.T.numel() for m in opt.ternary_modules)
    if weights == 0:
        return 0.0
    return sum(m.state_bytes() for m in opt.ternary_modules) / weights
