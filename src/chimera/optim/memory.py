"""Bytes of optimizer state, split into the roles every optimizer of the toolkit shares."""

from __future__ import annotations

import torch

# State key -> role. torch's Adam/AdamW moments map onto Chimera21's m/v; every other
# tensor (step counters, amsgrad maxima, integer accumulators, ...) counts as "other".
_ROLE_OF_KEY = {
    "m": "m",
    "exp_avg": "m",
    "momentum_buffer": "m",
    "trunk_momentum_buffer": "m",
    "sign_momentum": "m",
    "v": "v",
    "exp_avg_sq": "v",
    "psi": "psi",
}


def optimizer_state_memory_summary(opt: torch.optim.Optimizer) -> dict[str, int]:
    """``{m, v, psi, other, total}``: bytes held in tensor state of ``opt``.

    Works for every optimizer of the toolkit and torch's own (``exp_avg``/``exp_avg_sq`` count
    as m/v). Python scalars in the state are not counted; only tensors are. ScaledOptum keeps
    its integer state in the buffers of the modules it trains (pressure, corr_accum, E, step):
    those count as ``other``.
    """
    out = {"m": 0, "v": 0, "psi": 0, "other": 0}
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[_ROLE_OF_KEY.get(key, "other")] += value.numel() * value.element_size()
    out["other"] += sum(m.state_bytes() for m in getattr(opt, "ternary_modules", ()))
    out["total"] = sum(out.values())
    return out


def optimizer_state_memory_bytes(opt: torch.optim.Optimizer) -> int:
    """Total bytes of tensor state of ``opt``: ``optimizer_state_memory_summary(opt)["total"]``
    (the original project's name and signature)."""
    return optimizer_state_memory_summary(opt)["total"]
