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
    return stat_of_magnitudes(w.abs(), mode)


def stat_of_magnitudes(magnitudes: Tensor, mode: str = "mean") -> Tensor:
    """:func:`abs_stat` of W given ``|W|`` (a buffer the caller reuses)."""
    if choice("stat_mode", mode, STAT_MODES) == "mean":
        return magnitudes.mean()
    return magnitudes.median()


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
    return torch.sign(u) * (u.abs() > chimera_threshold(u, gamma, alpha)).to(u.dtype)


def chimera_threshold(u: Tensor, gamma: Tensor | float, alpha: Tensor | float) -> Tensor | float:
    """``alpha * gamma``, the threshold of :func:`quantize_weight_chimera` (a tensor alpha is
    first rounded to U's precision, at least float32; a float alpha is range-checked)."""
    if isinstance(alpha, Tensor):
        alpha = alpha.to(torch.promote_types(u.dtype, torch.float32))
    else:
        number("alpha", alpha, 0)
    return alpha * gamma


def scaled_ternary(
    u: Tensor, gamma: Tensor, alpha: Tensor | float, quant_mode: str, out: Tensor
) -> Tensor:
    """``gamma * T`` of the ``quant_mode`` quantizer (``"chimera"`` or ``"strict_bitnet"``)
    written into ``out`` (U's shape and dtype; it may hold ``|U|``): three or four in-place
    passes, no temporaries, and one host sync (the threshold becomes a Python float).

    T is ``sign(hardshrink(V, lambd))``: chimera ``V = U``, ``lambd = alpha * gamma``; strict
    ``V = U / gamma``, ``lambd = 0.5`` (``clamp(round(V), -1, 1)`` is nonzero exactly when
    ``|V| > 0.5``). Equal bit for bit to ``gamma * T`` with zeros ``+0`` for float32/float64
    U and a finite ``gamma > 0`` (float16/bfloat16 would round the threshold differently). The
    Bit layers use it only where ``gamma * T`` is also ``gamma * (U + (T - U))`` (finite
    ``|U| < 2^24`` for float32; a NaN weight gives 0 here but NaN there).
    """
    if quant_mode == "chimera":
        v, lambd = u, float(chimera_threshold(u, gamma, alpha))
    elif quant_mode == "strict_bitnet":
        v, lambd = torch.div(u, gamma, out=out), 0.5
    else:
        raise ValueError(f"quant_mode must be 'chimera' or 'strict_bitnet', got {quant_mode!r}")
    return torch.hardshrink(v, lambd, out=out).sign_().mul_(gamma)


def traced() -> bool:
    """Whether a tracer or transform runs the code (dynamo, export, jit, a ``torch.func``
    transform): the eager-only forms (in-place chains, one-pass reductions, host syncs) are
    then replaced by the plain formulas, which the compilers fuse anyway."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing() or torch._C._functorch.peek_interpreter_stack() is not None)


def abs_max(x: Tensor, mode: str) -> Tensor:
    """``max|x|`` over the tensor (``per_tensor``) or per row of the last dim (``per_token``).

    Eagerly ``max(max x, -min x)``: one pass, no ``|x|`` temporary, the same value (a max is
    exact). Traced (compile, export, jit): ``amax(|x|)``, which inductor fuses and ONNX knows.
    """
    per_tensor = mode == "per_tensor"
    if traced():
        return x.abs().max() if per_tensor else x.abs().amax(dim=-1, keepdim=True)
    low, high = x.aminmax() if per_tensor else x.aminmax(dim=-1, keepdim=True)
    return torch.maximum(high, low.neg())


def activation_scale(x: Tensor, mode: str, eps_beta: float) -> Tensor:
    """The int8 activation scale ``beta = max|x| / 127 + eps_beta`` (``per_tensor``, or
    ``per_token``: per row of the last dim, kept as a column)."""
    return abs_max(x, mode) / 127 + eps_beta


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
    data = x.detach()
    beta = activation_scale(data, mode, eps_beta)
    if not ste:
        return beta * torch.clamp(torch.round(x / beta), -127, 127)
    if traced():
        return x + (beta * torch.clamp(torch.round(data / beta), -127, 127) - data)
    # x + (beta * x_q - x) in place on one buffer (the values of the formula above)
    value = torch.div(data, beta).round_().clamp_(-127, 127).mul_(beta).sub_(data).add_(data)
    return StraightThrough.apply(x, value) if x.requires_grad else value


class StraightThrough(torch.autograd.Function):
    """Forward: ``value`` (computed without autograd); backward: the gradient to ``x``
    unchanged, the gradient of ``x + (value - x).detach()``."""

    @staticmethod
    def forward(ctx: object, x: Tensor, value: Tensor) -> Tensor:
        return value

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None
