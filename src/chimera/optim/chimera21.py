"""Chimera21: agreement-gated Adam (docs/algorithms.md#chimera21).

Adam whose step is scaled, per element, by ``kappa = clamp(exp(lambda_gate * psi))``, where
``psi`` is an exponential average of the agreement ``sign(m) * sign(g)`` between momentum and
gradient. The math lives in two module-level functions, torch.optim style:
``_single_tensor_chimera21`` (a for-loop, the ground truth) and ``_multi_tensor_chimera21``
(``torch._foreach_*`` kernels, the same operations in the same order); ``_compiled_chimera21``
(``fused=True``) runs the for-loop's operations per tensor (``_chimera21_tensor``) under
``torch.compile``, where each parameter's update becomes a single pass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from chimera._validate import choice, number, number_tuple, require
from chimera.optim._common import (
    FusableOptimizer,
    check_loaded_state,
    evaluate_closure,
    upgrade_saved_state,
    use_foreach,
)
from chimera.optim._fused import (
    check_fused,
    flat_views,
    run_compiled,
    use_fused,
    worth_compiling_on_cpu,
)

ZERO_GRAD_POLICIES = ("standard", "freeze", "decay", "inertia")
KAPPA_GATE_MODES = ("none", "noise_ratio")
PSI_STORAGES = ("fp32", "int8")
PSI_INT8_SCALE = 127.0
PSI_SATURATION = 0.999  # |psi| at or above this counts as saturated in the diagnostics

# Group keys the update functions take as keyword arguments.
_MATH_KEYS = (
    "lr",
    "beta1",
    "beta2",
    "eps_opt",
    "weight_decay",
    "rho_psi",
    "lambda_gate",
    "kappa_min",
    "kappa_max",
    "zero_grad_policy",
    "idle_decay",
    "kappa_gate_mode",
    "noise_threshold",
    "gate_sharpness",
    "psi_storage",
    "maximize",
)
# Group keys a loaded state may lack (the original project's states, older ones): they take
# this optimizer's constructor values; ``betas`` follows ``beta1``/``beta2``.
_FILLED_ON_LOAD = ("maximize", "foreach", "fused")

# The original project's names (Optimizer Chimera v0.13), plus ``count``.
DIAGNOSTIC_KEYS = (
    "count",
    "mean_kappa",
    "std_kappa",
    "min_kappa",
    "max_kappa",
    "mean_noise_ratio",
    "mean_effective_lr",
    "active_mean_effective_lr",
    "applied_update_norm",
    "param_update_ratio",
    "mean_update_abs",
    "max_update_abs",
    "zero_grad_ratio",
    "active_grad_ratio",
    "psi_abs_mean",
    "psi_saturation_ratio",
    "collision_score",
)


def _check_hyperparameters(hp: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first hyper-parameter of ``hp`` outside its domain (every
    number must be finite)."""
    number("lr", hp["lr"], 0)
    for name in ("beta1", "beta2"):
        number(name, hp[name], 0, 1, high_open=True)
    number("eps_opt", hp["eps_opt"], 0, low_open=True)
    number("weight_decay", hp["weight_decay"], 0)
    number("rho_psi", hp["rho_psi"], 0, 1)
    number("lambda_gate", hp["lambda_gate"])
    number("kappa_min", hp["kappa_min"], 0, low_open=True)
    kmin, kmax = hp["kappa_min"], number("kappa_max", hp["kappa_max"])
    require(kmax >= kmin, "kappa_max", hp["kappa_max"], f"a number >= kappa_min = {kmin!r}")
    choice("zero_grad_policy", hp["zero_grad_policy"], ZERO_GRAD_POLICIES)
    number("idle_decay", hp["idle_decay"], 0, 1)
    choice("kappa_gate_mode", hp["kappa_gate_mode"], KAPPA_GATE_MODES)
    number("noise_threshold", hp["noise_threshold"])
    number("gate_sharpness", hp["gate_sharpness"], 0)
    require(isinstance(hp["log_diagnostics"], bool), "log_diagnostics", hp["log_diagnostics"],
            "True or False")
    choice("psi_storage", hp["psi_storage"], PSI_STORAGES)
    require(isinstance(hp["maximize"], bool), "maximize", hp["maximize"], "True or False")
    check_fused(hp["fused"], hp["foreach"])


def _check_saved_group(saved: dict[str, Any]) -> None:
    """A loaded param group: valid hyper-parameters, and a ``betas`` (absent from the original
    project's states) equal to ``(beta1, beta2)``, as every group of this optimizer keeps it."""
    _check_hyperparameters(saved)
    if "betas" in saved:
        betas = number_tuple("betas", saved["betas"], 2, 0, 1, high_open=True)
        require(betas == (saved["beta1"], saved["beta2"]), "betas", saved["betas"],
                f"(beta1, beta2) = {(saved['beta1'], saved['beta2'])}")


def _resolve_aliases(hp: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Map the torch spellings ``betas=(b1, b2)`` and ``eps`` onto ``beta1``/``beta2``/``eps_opt``.

    An alias conflicts with an explicit value when that value differs from its default and
    from the alias: ``ValueError``.
    """
    out = {k: v for k, v in hp.items() if k not in ("betas", "eps")}
    aliased: dict[str, Any] = {}
    if hp.get("betas") is not None:
        betas = number_tuple("betas", hp["betas"], 2, 0, 1, high_open=True)
        aliased.update(beta1=betas[0], beta2=betas[1])
    if hp.get("eps") is not None:
        aliased["eps_opt"] = number("eps", hp["eps"], 0, low_open=True)
    for key, value in aliased.items():
        alias = "betas" if key.startswith("beta") else "eps"
        explicit = out.get(key, defaults[key])
        if explicit != defaults[key] and explicit != value:
            raise ValueError(
                f"Conflicting {key}: {explicit!r} and {alias}={hp[alias]!r}; give only one"
            )
        out[key] = value
    return out


def _decode_psi(psi: Tensor, dtype: torch.dtype, psi_storage: str) -> Tensor:
    """psi as a float tensor (int8 storage holds ``round(psi * 127)``)."""
    return psi.to(dtype).div_(PSI_INT8_SCALE) if psi_storage == "int8" else psi


def _encode_psi_int8(psi: Tensor) -> Tensor:
    """``clamp(round(clamp(psi, -1, 1) * 127), -127, 127)`` (still a float tensor)."""
    return psi.clamp(-1, 1).mul_(PSI_INT8_SCALE).round_().clamp_(-127, 127)


def _idle_psi(policy: str, psi: Tensor, m: Tensor, rho_psi: float, idle_decay: float) -> Tensor:
    """psi where ``g == 0`` under the freeze, decay or inertia policy."""
    if policy == "freeze":
        return psi
    if policy == "decay":
        return psi * idle_decay
    return psi * rho_psi + m.sign().square_() * (1 - rho_psi)  # inertia


def _diagnostic_row(
    p_sq: Tensor,
    g: Tensor,
    kappa: Tensor,
    s: Tensor,
    noise: Tensor,
    update: Tensor,
    psi: Tensor,
    *,
    lr: float,
    eps_opt: float,
) -> Tensor:
    """Per-parameter sums (float64) that ``_summarize_diagnostics`` combines; see ``_ROW``."""
    k = kappa.double()
    n = k.numel()
    eff_lr = lr * k / (s.double() + eps_opt)
    active = g != 0
    upd = update.double().abs()
    noise = noise.double()
    return torch.stack(
        [
            torch.tensor(float(n), dtype=torch.float64, device=k.device),
            active.sum().double(),
            k.sum(),
            (k - k.mean()).square().sum(),
            k.min(),
            k.max(),
            noise.sum(),
            eff_lr.sum(),
            torch.where(active, eff_lr, 0.0).sum(),
            upd.square().sum(),
            upd.sum(),
            upd.max(),
            psi.double().abs().sum(),
            (psi.abs() >= PSI_SATURATION).sum().double(),
            (k.log().abs() * noise).sum(),
            p_sq,
        ]
    )


_ROW = (
    "n",
    "active",
    "kappa",
    "kappa_m2",
    "kappa_min",
    "kappa_max",
    "noise",
    "eff_lr",
    "active_eff_lr",
    "update_sq",
    "update_abs",
    "update_abs_max",
    "psi_abs",
    "psi_saturated",
    "collision",
    "param_sq",
)


def _summarize_diagnostics(rows: list[Tensor]) -> dict[str, float]:
    """Aggregate per-parameter rows over all elements; no row (no element had a gradient) gives
    ``{}``, as in the original project.

    ``std_kappa`` is the population standard deviation (combined exactly from per-parameter
    means and centred sums of squares); ``active_mean_effective_lr`` is 0.0 without an element
    with ``g != 0`` (the original's value).
    """
    if not rows:
        return {}
    stacked = torch.stack([r.to(rows[0].device) for r in rows]).tolist()  # one host sync
    table = [dict(zip(_ROW, r, strict=True)) for r in stacked]
    tot = {key: sum(r[key] for r in table) for key in _ROW}
    n, active = tot["n"], tot["active"]
    kappa_mean = tot["kappa"] / n
    kappa_m2 = tot["kappa_m2"] + sum(
        r["n"] * (r["kappa"] / r["n"] - kappa_mean) ** 2 for r in table
    )
    update_norm = math.sqrt(tot["update_sq"])
    param_norm = math.sqrt(tot["param_sq"])
    return {
        "count": n,
        "mean_kappa": kappa_mean,
        "std_kappa": math.sqrt(kappa_m2 / n),
        "min_kappa": min(r["kappa_min"] for r in table),
        "max_kappa": max(r["kappa_max"] for r in table),
        "mean_noise_ratio": tot["noise"] / n,
        "mean_effective_lr": tot["eff_lr"] / n,
        "active_mean_effective_lr": tot["active_eff_lr"] / active if active else 0.0,
        "applied_update_norm": update_norm,
        "param_update_ratio": update_norm / param_norm if param_norm > 0 else math.nan,
        "mean_update_abs": tot["update_abs"] / n,
        "max_update_abs": max(r["update_abs_max"] for r in table),
        "zero_grad_ratio": (n - active) / n,
        "active_grad_ratio": active / n,
        "psi_abs_mean": tot["psi_abs"] / n,
        "psi_saturation_ratio": tot["psi_saturated"] / n,
        "collision_score": tot["collision"] / n,
    }


def _single_tensor_chimera21(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    psis: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps_opt: float,
    weight_decay: float,
    rho_psi: float,
    lambda_gate: float,
    kappa_min: float,
    kappa_max: float,
    zero_grad_policy: str,
    idle_decay: float,
    kappa_gate_mode: str,
    noise_threshold: float,
    gate_sharpness: float,
    psi_storage: str,
    maximize: bool,
    diagnostics: list[Tensor] | None = None,
) -> None:
    """Chimera21 update, one tensor at a time (ground truth; equations in ``Chimera21``).

    With ``diagnostics`` (a list), one row of per-parameter sums is appended for every
    non-empty parameter.
    """
    for p, g, m, v, psi, step_t in zip(params, grads, ms, vs, psis, steps, strict=True):
        p_sq = p.double().square().sum() if diagnostics is not None else None
        g = -g if maximize else g
        step_t += 1
        t = step_t.item()
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat = m / (1 - beta1**t)
        s = (v / (1 - beta2**t)).sqrt_()
        d = m_hat / (s + eps_opt)
        agreement = m.sign().mul_(g.sign())
        psi_old = _decode_psi(psi, p.dtype, psi_storage)
        psi_new = psi_old.mul(rho_psi).add_(agreement, alpha=1 - rho_psi)
        if zero_grad_policy != "standard":
            idle = _idle_psi(zero_grad_policy, psi_old, m, rho_psi, idle_decay)
            psi_new = torch.where(g == 0, idle, psi_new)
        kappa = psi_new.mul(lambda_gate).exp_().clamp_(kappa_min, kappa_max)
        noise = None
        if kappa_gate_mode == "noise_ratio" or diagnostics is not None:
            noise = s / (m_hat.abs().add_(eps_opt))
        if kappa_gate_mode == "noise_ratio":
            gate = noise.neg().add_(noise_threshold).mul_(gate_sharpness).sigmoid_()
            kappa.sub_(1).mul_(gate).add_(1)
        psi.copy_(_encode_psi_int8(psi_new) if psi_storage == "int8" else psi_new)
        p.addcmul_(kappa, d, value=-lr)
        if diagnostics is not None and p.numel() > 0:
            diagnostics.append(
                _diagnostic_row(
                    p_sq,
                    g,
                    kappa,
                    s,
                    noise,
                    kappa * d * lr,
                    _decode_psi(psi, p.dtype, psi_storage),
                    lr=lr,
                    eps_opt=eps_opt,
                )
            )


def _multi_tensor_chimera21(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    psis: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    **hp: Any,
) -> None:
    """Chimera21 update with ``torch._foreach_*`` kernels: the operations of the for-loop path
    in the same order (see ``_foreach_chimera21``); bias corrections from Python floats."""
    if not params:
        return
    torch._foreach_add_(steps, 1)
    ts = [t.item() for t in steps]
    _foreach_chimera21(
        params,
        grads,
        ms,
        vs,
        psis,
        bias1=[1 - beta1**t for t in ts],
        bias2=[1 - beta2**t for t in ts],
        decay=1 - lr * weight_decay if weight_decay != 0 else None,
        neg_lr=-lr,
        beta1=beta1,
        beta2=beta2,
        **hp,
    )


def _compiled_chimera21(
    groups: list[list[list[Tensor]]], *scalars: Tensor, hps: tuple[tuple[tuple[str, Any], ...], ...]
) -> list[Tensor]:
    """The function ``fused=True`` compiles: every group of one device in one graph, one
    ``_chimera21_tensor`` per parameter (inductor makes each a single pass over its tensors).
    Group i is ``[params, grads, ms, vs, psis, steps]`` with the hyper-parameter items
    ``hps[i]``; its ``lr`` and ``decay = 1 - lr * weight_decay`` are ``scalars[2i]`` and
    ``scalars[2i+1]`` (0-dim float64, rounded to each parameter's dtype as the eager paths round
    their Python floats). The bias corrections ``1 - beta^t = -expm1(t * ln(beta))`` come from
    the float32 step tensors (within a few float32 ulps of the eager value). Returns the
    per-step scalars it computed: as graph outputs they are computed once, not per element."""
    once: list[Tensor] = []
    for i, (lists, items) in enumerate(zip(groups, hps, strict=True)):
        params, grads, ms, vs, psis, steps = lists
        hp = dict(items)
        torch._foreach_add_(steps, 1)
        per_dtype = {}
        for dtype in dict.fromkeys(p.dtype for p in params):
            per_dtype[dtype] = (scalars[2 * i + 1].to(dtype), scalars[2 * i].neg().to(dtype))
            once += per_dtype[dtype]
        t = torch.stack(steps)
        bias1, bias2 = _bias_correction(t, hp["beta1"]), _bias_correction(t, hp["beta2"])
        once += [bias1, bias2]
        for j, tensors in enumerate(zip(params, grads, ms, vs, psis, strict=True)):
            decay, neg_lr = per_dtype[tensors[0].dtype]
            _chimera21_tensor(
                *flat_views(tensors), bias1[j], bias2[j], decay=decay, neg_lr=neg_lr, **hp
            )
    return once



def _chimera21_tensor(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    psi: Tensor,
    bias1: Tensor,
    bias2: Tensor,
    *,
    decay: Tensor,
    neg_lr: Tensor,
    beta1: float,
    beta2: float,
    eps_opt: float,
    rho_psi: float,
    lambda_gate: float,
    kappa_min: float,
    kappa_max: float,
    zero_grad_policy: str,
    idle_decay: float,
    kappa_gate_mode: str,
    noise_threshold: float,
    gate_sharpness: float,
    psi_storage: str,
    maximize: bool,
) -> None:
    """One parameter's update after the step increment, elementwise (the compiled path; the
    operations of ``_single_tensor_chimera21`` in its order): ``bias1``/``bias2`` are
    ``1 - beta^t``, ``decay`` is ``1 - lr * wd`` and ``neg_lr`` is ``-lr``, 0-dim tensors."""
    g = -g if maximize else g
    p.mul_(decay)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m_hat = m / bias1
    s = (v / bias2).sqrt()
    d = m_hat / (s + eps_opt)
    agreement = m.sign() * g.sign()
    psi_old = _decode_psi(psi, p.dtype, psi_storage)
    psi_new = psi_old.mul(rho_psi).add_(agreement, alpha=1 - rho_psi)
    if zero_grad_policy != "standard":
        idle = _idle_psi(zero_grad_policy, psi_old, m, rho_psi, idle_decay)
        psi_new = torch.where(g == 0, idle, psi_new)
    kappa = psi_new.mul(lambda_gate).exp_().clamp_(kappa_min, kappa_max)
    if kappa_gate_mode == "noise_ratio":
        noise = s / (m_hat.abs() + eps_opt)
        gate = noise.neg().add_(noise_threshold).mul_(gate_sharpness).sigmoid_()
        kappa = kappa.sub(1).mul_(gate).add_(1)
    psi.copy_(_encode_psi_int8(psi_new) if psi_storage == "int8" else psi_new)
    p.add_((kappa * neg_lr) * d)  # addcmul's rounding: (-lr * kappa) * d


def _foreach_chimera21(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    psis: list[Tensor],
    *,
    bias1: list[float],
    bias2: list[float],
    decay: float | None,
    neg_lr: float,
    beta1: float,
    beta2: float,
    eps_opt: float,
    rho_psi: float,
    lambda_gate: float,
    kappa_min: float,
    kappa_max: float,
    zero_grad_policy: str,
    idle_decay: float,
    kappa_gate_mode: str,
    noise_threshold: float,
    gate_sharpness: float,
    psi_storage: str,
    maximize: bool,
) -> None:
    """The multi-tensor update after the step increment (the foreach path); ``bias1``/``bias2``
    are ``1 - beta^t`` per tensor, ``decay`` is ``1 - lr * wd`` (None: no decay) and
    ``neg_lr`` is ``-lr``. Exceptions
    to foreach, per tensor: the int8 decode's dtype cast and the zero-grad policy's
    ``torch.where`` (there is no foreach comparison or select)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if decay is not None:
        torch._foreach_mul_(params, decay)
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, grads, alpha=1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    m_hat = torch._foreach_div(ms, bias1)
    s = torch._foreach_div(vs, bias2)
    torch._foreach_sqrt_(s)
    d = torch._foreach_div(m_hat, torch._foreach_add(s, eps_opt))
    agreement = torch._foreach_sign(ms)
    torch._foreach_mul_(agreement, torch._foreach_sign(grads))
    if psi_storage == "int8":
        psi_old = [psi.to(p.dtype) for psi, p in zip(psis, params, strict=True)]
        torch._foreach_div_(psi_old, PSI_INT8_SCALE)
    else:
        psi_old = psis
    psi_new = torch._foreach_mul(psi_old, rho_psi)
    torch._foreach_add_(psi_new, agreement, alpha=1 - rho_psi)
    if zero_grad_policy != "standard":
        psi_new = [
            torch.where(g == 0, _idle_psi(zero_grad_policy, old, m, rho_psi, idle_decay), new)
            for g, old, m, new in zip(grads, psi_old, ms, psi_new, strict=True)
        ]
    kappa = torch._foreach_mul(psi_new, lambda_gate)
    torch._foreach_exp_(kappa)
    torch._foreach_clamp_min_(kappa, kappa_min)
    torch._foreach_clamp_max_(kappa, kappa_max)
    if kappa_gate_mode == "noise_ratio":
        denom = torch._foreach_abs(m_hat)
        torch._foreach_add_(denom, eps_opt)
        gate = torch._foreach_div(s, denom)  # the noise ratio
        torch._foreach_neg_(gate)
        torch._foreach_add_(gate, noise_threshold)
        torch._foreach_mul_(gate, gate_sharpness)
        torch._foreach_sigmoid_(gate)
        torch._foreach_sub_(kappa, 1)
        torch._foreach_mul_(kappa, gate)
        torch._foreach_add_(kappa, 1)
    if psi_storage == "int8":
        torch._foreach_clamp_min_(psi_new, -1)
        torch._foreach_clamp_max_(psi_new, 1)
        torch._foreach_mul_(psi_new, PSI_INT8_SCALE)
        torch._foreach_round_(psi_new)
        torch._foreach_clamp_min_(psi_new, -127)
        torch._foreach_clamp_max_(psi_new, 127)
    torch._foreach_copy_(psis, psi_new)
    torch._foreach_addcmul_(params, kappa, d, value=neg_lr)


def _bias_correction(step: Tensor, beta: float) -> Tensor:
    """``1 - beta^step`` as ``-expm1(step * ln(beta))``, accurate for small ``step * ln(beta)``
    where ``1 - pow`` in float32 would cancel (``beta = 0`` gives 1)."""
    log_beta = math.log(beta) if beta > 0 else -math.inf
    return torch.expm1(step * log_beta).neg()


def _lr_and_decay(hp: dict[str, Any]) -> tuple[float, float]:
    """The per-step scalars of a compiled group: ``lr`` and ``1 - lr * weight_decay``."""
    return hp["lr"], 1 - hp["lr"] * hp["weight_decay"]


def _static_items(hp: dict[str, Any]) -> list[tuple[str, Any]]:
    """The hyper-parameters a compiled graph bakes in (all but lr and weight decay)."""
    return [(k, v) for k, v in hp.items() if k not in ("lr", "weight_decay")]


class _SyncedBetas(dict):
    """A Chimera21 param group in which ``betas`` and ``beta1``/``beta2`` stay one value:
    writing either spelling rewrites the other, so torch's schedulers that cycle ``betas``
    (``OneCycleLR(cycle_momentum=True)``, ``CyclicLR``) drive the beta1 the step uses."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "betas":
            value = number_tuple("betas", value, 2, 0, 1, high_open=True)
            super().__setitem__("beta1", value[0])
            super().__setitem__("beta2", value[1])
        super().__setitem__(key, value)
        if key in ("beta1", "beta2") and "betas" in self:
            super().__setitem__("betas", (self["beta1"], self["beta2"]))

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _synced_group(group: dict[str, Any]) -> _SyncedBetas:
    """``group`` as a ``_SyncedBetas`` whose ``betas`` is ``(beta1, beta2)``."""
    synced = _SyncedBetas(group)
    synced["betas"] = (group["beta1"], group["beta2"])
    return synced


class Chimera21(FusableOptimizer):
    r"""Agreement-gated Adam (docs/algorithms.md#chimera21).

    For each parameter p with gradient g, t the step count after the increment::

        p     <- p * (1 - lr * weight_decay)                    (decoupled weight decay)
        m     <- beta1 * m + (1 - beta1) * g
        v     <- beta2 * v + (1 - beta2) * g^2
        m_hat  = m / (1 - beta1^t);  s = sqrt(v / (1 - beta2^t));  d = m_hat / (s + eps_opt)
        a      = sign(m) * sign(g)                              (updated m; sign(0) = 0)
        psi'   = rho_psi * psi + (1 - rho_psi) * a
        where g == 0 exactly, zero_grad_policy decides psi':
            standard: psi' as is;  freeze: psi;  decay: psi * idle_decay;
            inertia: rho_psi * psi + (1 - rho_psi) * sign(m)^2
        kappa  = clamp(exp(lambda_gate * psi'), kappa_min, kappa_max)
        if kappa_gate_mode == "noise_ratio":
            noise = s / (|m_hat| + eps_opt)
            kappa = 1 + sigmoid(gate_sharpness * (noise_threshold - noise)) * (kappa - 1)
        psi   <- psi'   (int8: clamp(round(clamp(psi', -1, 1) * 127), -127, 127))
        p     <- p - lr * kappa * d

    kappa uses the unrounded psi'; with ``psi_storage="int8"`` the stored value is decoded as
    ``psi / 127`` on the next step. ``maximize=True`` runs the step on ``-g`` (gradient ascent).
    ``betas=(b1, b2)`` and ``eps`` are accepted as aliases of ``beta1``/``beta2`` and
    ``eps_opt``, in the constructor and in param groups. Every group also carries ``betas``,
    kept equal to ``(beta1, beta2)``: writing ``group["betas"]`` (as torch's
    ``OneCycleLR(cycle_momentum=True)`` does) sets ``beta1``/``beta2``, and the other way round.

    State per parameter, created at its first step with a gradient: ``m``, ``v`` (like p),
    ``psi`` (like p with ``psi_storage="fp32"``, i.e. in p's floating dtype; int8 otherwise) and
    ``step``, a 0-dim float32 tensor as in ``torch.optim.Adam`` (exact up to 2^24 steps).
    Parameters whose grad is None are untouched and get no state; sparse gradients raise
    ``RuntimeError``.

    ``foreach``: True forces the ``torch._foreach_*`` path, False the for-loop path, None picks
    foreach where torch would (all tensors of a group on one CUDA/XPU device with one dtype).
    On CPU both paths run the same kernels in the same order and agree bit for bit.

    ``fused``: True runs the step compiled by ``torch.compile`` (inductor: triton on CUDA, C++
    on CPU): the equations above per parameter, which inductor fuses into one pass that reads
    p, g, m, v, psi and writes p, m, v, psi once (one graph for all compiled groups of a
    device). False never compiles. None (default) compiles when ``foreach`` is None too and the
    group sits on one device: on CUDA where torch.compile and triton are usable, on CPU when
    the parameters with a gradient hold ``chimera.optim._fused.CPU_MIN_NUMEL`` (2^20)
    elements or more together, so tests and small models never compile. On CPU (1 thread,
    GPT-2 small's shapes) the compiled step is ~1.5x ``AdamW(fused=True)`` against ~7x for
    foreach; the first step pays a one-time compile (~2 min cold for GPT-2's 148 tensors,
    ~1 min for ResNet-20's 65; ~10 s once inductor's cross-process cache holds the kernels).
    ``fused=True`` with ``foreach=True`` is a ``ValueError``. lr, weight decay and the step
    counts enter the graph as tensors (a schedule recompiles nothing); the compiled step keeps
    ``step`` on the parameter's device, as ``torch.optim.Adam(fused=True)`` does. Results
    match the for-loop path up to float rounding (the bias corrections are
    ``-expm1(t * ln(beta))`` in float32, a few ulps from the eager value); an int8 ``psi`` can
    differ by one unit only where ``psi' * 127`` lies within rounding error of a half-integer
    (psi' depends on signs only, so this needs a rounding difference in ``rho_psi * psi``). As
    for ``foreach``, ``load_state_dict`` restores the saved groups' ``fused``; a state saved
    by any path continues on any other.

    ``load_state_dict`` also takes the states saved by the original project (Optimizer Chimera
    v0.13: groups without ``maximize``/``foreach``/``fused``/``betas``, which take this
    optimizer's values, and a Python-int ``step``) and continues as the original would; its
    int8 ``psi`` is restored exactly (the original, reloading its own state, reads it as float).

    ``log_diagnostics`` (per group): after each step ``last_diagnostics`` maps
    ``DIAGNOSTIC_KEYS`` (the original project's names, plus ``count``) to floats aggregated
    over every element of the logging groups that had a gradient: kappa statistics
    (``std_kappa`` is the population std), ``mean_noise_ratio``, ``mean_effective_lr`` =
    mean(lr * kappa / (s + eps_opt)) (``active_...`` over g != 0; 0.0 without such an
    element), ``applied_update_norm`` = ||lr * kappa * d||_2, ``param_update_ratio`` = that norm
    over the L2 norm of the same parameters before the step (before weight decay),
    ``mean_update_abs``/``max_update_abs`` of |lr * kappa * d|, zero/active gradient ratios,
    ``psi_abs_mean`` and ``psi_saturation_ratio`` (|psi| >= 0.999) of the stored psi after the
    step, and ``collision_score`` = mean(|ln kappa| * noise). Logging groups run the for-loop
    path. Without any logging group, or when no parameter of one had a gradient,
    ``last_diagnostics`` is ``{}``.
    """

    _PICKLED_ATTRIBUTES = ("last_diagnostics",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps_opt: float = 1e-8,
        weight_decay: float = 0.0,
        rho_psi: float = 0.95,
        lambda_gate: float = 0.1,
        kappa_min: float = 0.5,
        kappa_max: float = 2.0,
        log_diagnostics: bool = False,
        zero_grad_policy: str = "standard",
        idle_decay: float = 0.95,
        kappa_gate_mode: str = "none",
        noise_threshold: float = 2.0,
        gate_sharpness: float = 4.0,
        psi_storage: str = "fp32",
        *,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps_opt=eps_opt,
            weight_decay=weight_decay,
            rho_psi=rho_psi,
            lambda_gate=lambda_gate,
            kappa_min=kappa_min,
            kappa_max=kappa_max,
            log_diagnostics=log_diagnostics,
            zero_grad_policy=zero_grad_policy,
            idle_decay=idle_decay,
            kappa_gate_mode=kappa_gate_mode,
            noise_threshold=noise_threshold,
            gate_sharpness=gate_sharpness,
            psi_storage=psi_storage,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        defaults = _resolve_aliases({**defaults, "betas": betas, "eps": eps}, _CONSTRUCTOR_DEFAULTS)
        _check_hyperparameters(defaults)
        defaults["betas"] = (defaults["beta1"], defaults["beta2"])  # read by torch's schedulers
        super().__init__(params, defaults)
        self.last_diagnostics: dict[str, float] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyper-parameters (aliases included) are validated first."""
        group = {**self.defaults, **_resolve_aliases(param_group, self.defaults)}
        _check_hyperparameters(group)
        super().add_param_group(_synced_group(group))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's, then every group as a ``_SyncedBetas`` (also after ``load_state_dict``);
        states pickled before ``maximize`` existed get ``maximize=False``."""
        super().__setstate__(state)
        for i, group in enumerate(self.param_groups):
            group.setdefault("maximize", False)
            self.param_groups[i] = _synced_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, after checking that ``state_dict`` is a Chimera21 state for these
        parameters (groups with valid hyper-parameters; per parameter ``step``, ``m``, ``v``,
        ``psi`` of its shape), else ``ValueError``; an int8 ``psi`` stays int8 (torch casts
        floating state to the parameter's dtype). States of the original project are upgraded
        first (class docstring)."""
        state_dict = upgrade_saved_state(
            state_dict, {k: self.defaults[k] for k in _FILLED_ON_LOAD}, torch.float32
        )
        check_loaded_state(
            self,
            state_dict,
            group_keys=lambda group: self.defaults,
            check_group=lambda saved, group: _check_saved_group(saved),
            state_keys=lambda group: _STATE_KEYS,
            optional_keys=("betas",),
        )
        int8_ids = {
            pid
            for pid, s in state_dict["state"].items()
            if isinstance(s.get("psi"), Tensor) and s["psi"].dtype == torch.int8
        }
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params, strict=True):
            if pid in int8_ids:
                self.state[p]["psi"] = self.state[p]["psi"].to(torch.int8)

    def _init_group(
        self, group: dict[str, Any], params: list[Tensor], fused: bool
    ) -> list[list[Tensor]]:
        """Lists ``[grads, ms, vs, psis, steps]`` of ``params``, creating missing state and
        converting ``psi`` if the group's ``psi_storage`` changed since the last step; the
        compiled path (``fused``) keeps ``step`` on the parameter's device."""
        int8 = group["psi_storage"] == "int8"
        grads, ms, vs, psis, steps = lists = [[], [], [], [], []]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["psi"] = torch.zeros_like(
                    p, dtype=torch.int8 if int8 else p.dtype, memory_format=torch.preserve_format
                )
            elif (state["psi"].dtype == torch.int8) != int8:
                psi = state["psi"]
                state["psi"] = (
                    _encode_psi_int8(psi).to(torch.int8) if int8
                    else _decode_psi(psi, p.dtype, "int8")
                )
            step = state["step"]
            if fused and step.get_device() != p.get_device():  # ints: cheaper than devices
                step = state["step"] = step.to(p.device)
            grads.append(p.grad)
            ms.append(state["m"])
            vs.append(state["v"])
            psis.append(state["psi"])
            steps.append(step)
        return lists

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Chimera21 step; returns the closure's loss when a closure is given."""
        loss = evaluate_closure(closure)
        active = self._groups_with_grads()
        rows: list[Tensor] | None = None
        compiled: dict[torch.device, list[tuple]] = {}  # device -> (params, lists, hp) of groups
        cpu = worth_compiling_on_cpu(p for _, params in active for p in params)
        for group, params in active:
            fused = (
                bool(params)
                and not group["log_diagnostics"]
                and use_fused(group["fused"], params, group["foreach"], cpu=cpu)
            )
            lists = self._init_group(group, params, fused)
            hp = {k: group[k] for k in _MATH_KEYS}
            if group["log_diagnostics"]:
                rows = [] if rows is None else rows
                _single_tensor_chimera21(params, *lists, **hp, diagnostics=rows)
            elif fused:
                compiled.setdefault(params[0].device, []).append((params, lists, hp))
            elif use_foreach(group["foreach"], params):
                _multi_tensor_chimera21(params, *lists, **hp)
            else:
                _single_tensor_chimera21(params, *lists, **hp)
        for device, groups in compiled.items():
            run_compiled(
                _compiled_chimera21,
                [[params, *lists] for params, lists, _ in groups],
                key=[p for params, _, _ in groups for p in params],
                device=device,
                scalars=[x for _, _, hp in groups for x in _lr_and_decay(hp)],
                hps=tuple(tuple(_static_items(hp)) for _, _, hp in groups),
            )
        self.last_diagnostics = {} if rows is None else _summarize_diagnostics(rows)
        return loss


_STATE_KEYS = ("step", "m", "v", "psi")
_CONSTRUCTOR_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(Chimera21.__init__).parameters.items()
    if param.default is not param.empty
}
