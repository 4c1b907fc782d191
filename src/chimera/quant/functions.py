"""Ternary weight quantizers and the int8 activation quantizer
(docs/algorithms.md#weight-quantizers, #bit-layers).

Pure functions of their inputs. ``gamma`` is the weight scale, ``alpha`` the threshold factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chimera._validate import choice, number, require

ACT_QUANT_MODES = ("per_tensor", "per_token", "none")
STAT_MODES = ("mean", "median")


def _check_weight(u: object, name: str = "U") -> Tensor:
    if not isinstance(u, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {u.dtype}")
    require(u.numel() > 0, name, u, "non-empty")
    return u


def abs_stat(w: Tensor, mode: str = "mean") -> Tensor:
    """The weight scale statistic: ``mean(|W|)`` or ``median(|W|)`` (0-dim tensor)."""
    _check_weight(w, "W")
    if choice("stat_mode", mode, STAT_MODES) == "mean":
        return w.abs().mean()
    return w.abs().median()


def ema_update(old: Tensor, new: Tensor, rho: float) -> Tensor:
    """Exponential moving average step ``rho * old + (1 - rho) * new`` (a new tensor).

    ``rho`` must lie in [0, 1] (a comparison, not :func:`number`: traced under ``torch.compile``
    with symbolic floats, it adds a guard instead of a graph break).
    """
    require(0 <= rho <= 1, "rho", rho, "a number in [0, 1]")
    return old.mul(rho).add(new, alpha=1 - rho)


def quantize_weight_strict_bitnet(u: Tensor, gamma: Tensor | float) -> Tensor:
    """BitNet b1.58 absmean quantizer: ``clamp(round(U / gamma), -1, 1)`` (round half to even)."""
    _check_weight(u)
    return torch.clamp(torch.round(u / gamma), -1, 1)


def quantize_weight_chimera(u: Tensor, gamma: Tensor | float, alpha: Tensor | float) -> Tensor:
    """Dynamic-threshold quantizer: ``sign(U) * [|U| > alpha * gamma]`` (strict ``>``).

    ``alpha`` may be a 0-dim tensor (a schedule computed on the device; it is not range-checked,
    which would cost a host sync): it is rounded to U's precision (at least float32) before the
    product, exactly as a Python float alpha is, so both give the same T bit for bit.
    """
    _check_weight(u)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(torch.promote_types(u.dtype, torch.float32))
    else:
        number("alpha", alpha, 0)
    return torch.sign(u) * (u.abs() > alpha * gamma).to(u.dtype)


def quantize_activations(
    x: Tensor, mode: str = "per_tensor", eps_beta: float = 1e-6, ste: bool = True
) -> Tensor:
    """int8 fake-quantized activations, with a straight-through estimator unless ``ste=False``.

    ``beta = max|x| / 127 + eps_beta`` (per tensor, or per token = per row of the last dim),
    ``x_q = clamp(round(x / beta), -127, 127)``; returns ``x + (beta * x_q - x).detach()``:
    the forward value is ``beta * x_q`` and the gradient reaches ``x`` unchanged. ``ste=False``
    returns ``beta * x_q`` itself, whose gradient w.r.t. x is zero (``round`` has derivative 0);
    its value equals the STE's (``x + (beta * x_q - x)`` is exact by Sterbenz's lemma unless x
    lies within a rounding error of ``±beta / 2``).
    """
    if choice("act_quant", mode, ACT_QUANT_MODES) == "none":
        return x
    if mode == "per_tensor":
        beta = x.detach().abs().max() / 127 + eps_beta
    else:
        beta = x.detach().abs().amax(dim=-1, keepdim=True) / 127 + eps_beta
    if not ste:
        return beta * torch.clamp(torch.round(x / beta), -127, 127)
    x_q = torch.clamp(torch.round(x.detach() / beta), -127, 127)
    return x + (beta * x_q - x).detach()
