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

from chimera._validate import number, number_tuple, require
from chimera.optim._common import check_loaded_state, evaluate_closure, sign_keep_nan

_STATE_KEYS = ("exp_avg",)


def _check_group(group: dict[str, Any]) -> None:
    """``ValueError`` naming the first hyper-parameter of ``group`` outside its domain."""
    number("lr", group["lr"], 0)
    number_tuple("betas", group["betas"], 2, 0, 1, high_open=True)
    number("weight_decay", group["weight_decay"], 0)
    require(isinstance(group["maximize"], bool), "maximize", group["maximize"], "True or False")


def lion_update(
    p: Tensor, g: Tensor, m: Tensor, *, lr: float, beta1: float, beta2: float, weight_decay: float
) -> None:
    """One in-place Lion update of ``p`` and its momentum ``m``."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    c = m.mul(beta1).add_(g, alpha=1 - beta1)
    p.add_(sign_keep_nan(c), alpha=-lr)
    m.lerp_(g, 1 - beta2)


class Lion(torch.optim.Optimizer):
    """Lion optimizer; state ``exp_avg`` (the momentum m), one tensor per parameter.

    Hyper-parameters (constructor, added groups and loaded states): finite ``lr >= 0``,
    ``betas`` a pair in [0, 1), finite ``weight_decay >= 0``, ``maximize`` a bool.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
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
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lion_update(
                    p, g, state["exp_avg"], lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"],
                )
        return loss
