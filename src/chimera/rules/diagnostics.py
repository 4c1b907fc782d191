"""Credit diagnostics against exact costates (docs/algorithms.md#diagnostics). Pure: the model runs
in eval mode and
nothing is updated.

- ``costate_cosine``: ``mean_l mean_i cos(a_l,i, λ_l,i)``.
- ``perturbation_rho``: at layer l, example i, draw P perturbations ``δ = scale·RMS(h_l,i)·ε``;
  the Pearson correlation over the P draws between the predicted change ``<a_l,i, δ>`` and the
  actual change ``ℓ_i(h_l,i + δ) − ℓ_i(h_l,i)`` (forward-propagated to the loss), averaged over
  examples, then layers. Per example because the update only uses the credit's direction
  (``a_norm``): a per-example scale error must not count.
- ``nudging``: ``mean_l (ℓ(h_l − η·a_norm_l) − ℓ(h_l)) / ℓ(h_l)`` with the batch-mean loss
  (negative is good).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera._validate import integer, number
from chimera.rules.learning_rule import (
    LearningRule,
    LossFn,
    exact_costates,
    frozen,
    normalize_credit,
    per_example_loss,
    propagate,
    residual_states,
)

__all__ = ["costate_cosine", "credit_diagnostics", "exact_costates", "nudging",
           "perturbation_rho"]


def _check_credits(credits: Sequence[Tensor], states: Sequence[Tensor]) -> None:
    if len(credits) != len(states):
        raise ValueError(f"credits must hold one tensor per state h_0..h_L ({len(states)}), "
                         f"got {len(credits)}")
    for l, (a, h) in enumerate(zip(credits, states, strict=True)):
        if a.shape != h.shape:
            raise ValueError(f"credit a_{l} has shape {tuple(a.shape)}, state h_{l} has "
                             f"{tuple(h.shape)}")


def costate_cosine_per_layer(credits: Sequence[Tensor], costates: Sequence[Tensor]) -> list[float]:
    """``[mean_i cos(a_l,i, λ_l,i) for l = 0..L]``."""
    _check_credits(credits, costates)
    return [float(F.cosine_similarity(a.flatten(1), lam.flatten(1), dim=1).mean())
            for a, lam in zip(credits, costates, strict=True)]


def costate_cosine(credits: Sequence[Tensor], costates: Sequence[Tensor]) -> float:
    """Mean over layers and examples of ``cos(a_l, λ_l)``."""
    per_layer = costate_cosine_per_layer(credits, costates)
    return sum(per_layer) / len(per_layer)


def _pearson(u: Tensor, v: Tensor, dim: int) -> Tensor:
    u, v = u - u.mean(dim, keepdim=True), v - v.mean(dim, keepdim=True)
    return (u * v).sum(dim) / ((u.pow(2).sum(dim) * v.pow(2).sum(dim)).sqrt() + 1e-30)


@torch.no_grad()
def perturbation_rho(model: nn.Module, x: Tensor, c: Tensor, credits: Sequence[Tensor],
                     loss_fn: LossFn, *, num_perturbations: int = 16, scale: float = 1e-2,
                     generator: torch.Generator | None = None) -> float:
    """Pearson(predicted ``<a_l, δ>``, actual loss change) per example over
    ``num_perturbations`` (>= 2) draws of relative size ``scale`` (> 0), mean over examples and
    layers (see the module docstring)."""
    integer("num_perturbations", num_perturbations, 2)
    number("scale", scale, 0, low_open=True)
    with frozen(model):
        hs = residual_states(model, x)
        _check_credits(credits, hs)
        base = per_example_loss(loss_fn, model.head(hs[-1]), c)
        c_rep = c.repeat(num_perturbations, *[1] * (c.dim() - 1))
        rhos = []
        for l, (h, a) in enumerate(zip(hs, credits, strict=True)):
            rms = h.flatten(1).pow(2).mean(1).sqrt().view(1, -1, *[1] * (h.dim() - 1))
            eps = torch.randn((num_perturbations, *h.shape), generator=generator,
                              device=h.device)
            delta = scale * rms * eps
            predicted = (a.unsqueeze(0) * delta).flatten(2).sum(2)
            y = propagate(model, (h.unsqueeze(0) + delta).flatten(0, 1), l)
            actual = per_example_loss(loss_fn, y, c_rep).view(num_perturbations, -1) - base
            rhos.append(float(_pearson(predicted, actual, dim=0).mean()))
    return sum(rhos) / len(rhos)


@torch.no_grad()
def nudging(model: nn.Module, x: Tensor, c: Tensor, credits: Sequence[Tensor],
            loss_fn: LossFn, *, eta: float = 0.1) -> float:
    """``mean_l (ℓ(h_l − η·a_norm_l) − ℓ) / ℓ`` with the batch-mean loss ℓ (``eta`` > 0)."""
    number("eta", eta, 0, low_open=True)
    with frozen(model):
        hs = residual_states(model, x)
        _check_credits(credits, hs)
        loss = float(loss_fn(model.head(hs[-1]), c))
        changes = [float(loss_fn(propagate(model, h - eta * normalize_credit(a), l), c)) - loss
                   for l, (h, a) in enumerate(zip(hs, credits, strict=True))]
    return sum(changes) / len(changes) / loss


def credit_diagnostics(rule: LearningRule, x: Tensor, c: Tensor, *,
                       generator: torch.Generator | None = None) -> dict[str, Any]:
    """The rule's credits on (x, c) against exact costates from a separate BP pass:
    ``costate_cosine`` (and ``_per_layer``), ``perturbation_rho``, ``nudging``, and the rule's
    last ``bridge_residual`` (None for rules without a bridge or before the first step)."""
    credits = rule.credits(x, c)
    costates = exact_costates(rule.model, x, c, rule.loss_fn)
    per_layer = costate_cosine_per_layer(credits, costates)
    return {
        "costate_cosine": sum(per_layer) / len(per_layer),
        "costate_cosine_per_layer": per_layer,
        "perturbation_rho": perturbation_rho(rule.model, x, c, credits, rule.loss_fn,
                                             generator=generator),
        "nudging": nudging(rule.model, x, c, credits, rule.loss_fn),
        "bridge_residual": rule.bridge_residual,
    }
