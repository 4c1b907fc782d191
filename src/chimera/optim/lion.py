"""Lion: sign of interpolated momentum with decoupled weight decay (Chen et al., 2023).

Per parameter p with gradient g (``maximize`` flips g)::

    p <- p * (1 - lr * wd)
    c  = beta1 * m + (1 - beta1) * g
    p <- p - lr * sign(c)
    m <- beta2 * m + (1 - beta2) * g
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from chimera._validate import number, number_tuple, optional_bool, require
from chimera.optim._common import (
    check_loaded_state,
    evaluate_closure,
    sign_keep_nan,
    upgrade_saved_state,
    use_foreach,
)

_STATE_KEYS = ("exp_avg",)


def _check_group(group: dict[str, Any]) -> None:
    """``ValueError`` naming the first hyper-parameter of ``group`` outside its domain."""
    number("lr", group["lr"], 0)
    number_tuple("betas", group["betas"], 2, 0, 1, high_open=True)
    number("weight_decay", group["weight_decay"], 0)
    require(isinstance(group["maximize"], bool), "maximize", group["maximize"], "True or False")
    optional_bool("foreach", group["foreach"])


def lion_update(
    p: Tensor, g: Tensor, m: Tensor, *, lr: float, beta1: float, beta2: float, weight_decay: float
) -> None:
    """One in-place Lion update of ``p`` and its momentum ``m``."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    c = m.mul(beta1).add_(g, alpha=1 - beta1)
    p.add_(sign_keep_nan(c), alpha=-lr)
    m.lerp_(g, 1 - beta2)


def _single_tensor_lion(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, maximize: bool,
    **hp: float,
) -> None:
    """Lion, one tensor at a time (ground truth)."""
    for p, g, m in zip(params, grads, exp_avgs, strict=True):
        lion_update(p, -g if maximize else g, m, **hp)


def _multi_tensor_lion(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float,
    beta1: float, beta2: float, weight_decay: float, maximize: bool,
) -> None:
    """Lion with ``torch._foreach_*`` kernels: the operations of ``lion_update`` in its order."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, grads, alpha=1 - beta1)
    signs = torch._foreach_sign(c)
    torch._foreach_add_(signs, c, alpha=0)  # sign(NaN) stays NaN, as in sign_keep_nan
    torch._foreach_add_(params, signs, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)


class Lion(torch.optim.Optimizer):
    """Lion optimizer; state ``exp_avg`` (the momentum m), one tensor per parameter.

    Hyper-parameters (constructor, added groups and loaded states): finite ``lr >= 0``,
    ``betas`` a pair in [0, 1), finite ``weight_decay >= 0``, ``maximize`` a bool.

    ``foreach``: True runs the ``torch._foreach_*`` path, False the for-loop path, None picks
    foreach where torch would (``chimera.optim._common.use_foreach``); on CPU both agree bit for
    bit. A loaded state without ``foreach`` (older ones) takes this optimizer's value.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, foreach=foreach
        )
        _check_group(defaults)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyper-parameters are validated first."""
        _check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, after checking that ``state_dict`` is a Lion state for these
        parameters (groups with valid hyper-parameters; per parameter an ``exp_avg`` of its
        shape), else ``ValueError``."""
        state_dict = upgrade_saved_state(
            state_dict, {"foreach": self.defaults["foreach"]}, torch.get_default_dtype()
        )
        check_loaded_state(
            self,
            state_dict,
            group_keys=lambda group: self.defaults,
            check_group=lambda saved, group: _check_group(saved),
            state_keys=lambda group: _STATE_KEYS,
        )
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one Lion step; returns the closure's loss when a closure is given."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lion does not support sparse gradients")
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            beta1, beta2 = group["betas"]
            update = (
                _multi_tensor_lion if use_foreach(group["foreach"], params)
                else _single_tensor_lion
            )
            update(
                params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )
        return loss

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's; states pickled before ``foreach`` existed get ``foreach=None``."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
