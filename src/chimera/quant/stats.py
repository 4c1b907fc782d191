"""Ternary weight statistics and effective bits (docs/algorithms.md#statistics-and-effective-bits).

The effective bits of a ternary tensor are the Shannon entropy of its value distribution,
``H(z, p, m) = -(z log2 z + p log2 p + m log2 m)`` with ``0 log 0 = 0``; at most ``log2 3``.

Ternary layer protocol read by :func:`model_quant_stats`: a module is a ternary layer when it has
a ``get_last_stats()`` method; it returns ``None`` before its first forward, else a dict with at
least ``zero_ratio``, ``plus_ratio``, ``minus_ratio``, ``effective_bits`` and ``num_weights``
(optionally ``alpha``); an ``alpha_target`` attribute is optional.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from chimera._validate import choice, number, require

MAX_TERNARY_BITS = math.log2(3)
BRANCHES = ("sparse", "dense")
_RATIO_KEYS = ("zero_ratio", "plus_ratio", "minus_ratio", "effective_bits")


def _entropy(*ratios: float) -> float:
    return -sum(r * math.log2(r) for r in ratios if r > 0)


def entropy_from_ternary_ratios(z: float, p: float, m: float) -> float:
    """Shannon entropy in bits of the ratios of zeros, plus and minus ones."""
    for name, ratio in (("z", z), ("p", p), ("m", m)):
        number(name, ratio, 0)
    if abs(z + p + m - 1) > 1e-6:
        raise ValueError(f"ratios must sum to 1 (within 1e-6), got {z + p + m}")
    return _entropy(z, p, m)


def ternary_counts(tq: Tensor) -> Tensor:
    """``[#zeros, #(+1), #(-1)]`` of a ternary tensor as an int64 tensor on its device (no sync)."""
    return torch.stack([(tq == 0).sum(), (tq == 1).sum(), (tq == -1).sum()])


def sign_counts(q: Tensor) -> Tensor:
    """``[#zeros, #(+), #(-)]`` of ``gamma * T`` (gamma > 0) as an int64 tensor on its device:
    the counts of T in two counting passes (``q > 0``, ``q < 0``); anything else (zero, NaN)
    counts as a zero."""
    plus, minus = torch.count_nonzero(q > 0), torch.count_nonzero(q < 0)
    return torch.stack([q.numel() - plus - minus, plus, minus])


def stats_from_counts(zeros: int, plus: int, minus: int) -> dict[str, float]:
    """Ratios and effective bits from value counts (see :func:`ternary_stats`)."""
    total = zeros + plus + minus
    require(total > 0, "zeros + plus + minus", total, "> 0 (at least one weight)")
    z, p, m = zeros / total, plus / total, minus / total
    return {"zero_ratio": z, "plus_ratio": p, "minus_ratio": m, "effective_bits": _entropy(z, p, m)}


def ternary_stats(tq: Tensor) -> dict[str, float]:
    """``{zero_ratio, plus_ratio, minus_ratio, effective_bits}`` of a tensor of -1, 0, +1."""
    if not isinstance(tq, Tensor):
        raise TypeError(f"Tq must be a torch.Tensor, got {type(tq).__name__}")
    require(tq.numel() > 0, "Tq", tq, "non-empty")
    counts = ternary_counts(tq).tolist()
    if sum(counts) != tq.numel():
        raise ValueError("Tq must hold only the values -1, 0 and +1")
    return stats_from_counts(*counts)


def _symmetric_entropy(z: float) -> float:
    return _entropy(z, (1 - z) / 2, (1 - z) / 2)


def symmetric_zero_ratio_for_entropy(bits: float, branch: str = "sparse") -> float:
    """The zero ratio z with ``H(z, (1-z)/2, (1-z)/2) = bits``, by bisection.

    H rises from 1 bit (z = 0) to log2 3 (z = 1/3) and falls to 0 (z = 1): the ``sparse`` branch
    solves on [1/3, 1] (any bits in [0, log2 3]), the ``dense`` branch on [0, 1/3] (bits >= 1).
    """
    lowest = 1.0 if choice("branch", branch, BRANCHES) == "dense" else 0.0
    number(f"bits for the {branch} branch", bits, lowest, MAX_TERNARY_BITS)
    # keep the invariant: H(low) is on the high-entropy side, H(high) on the low one
    low, high = (1 / 3, 1.0) if branch == "sparse" else (1 / 3, 0.0)
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        if _symmetric_entropy(mid) > bits:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def model_quant_stats(model: nn.Module) -> dict[str, float | int | None]:
    """Model-level statistics over every ternary layer that has run a forward.

    ``global_*``: ratios weighted by each layer's weight count, ``global_effective_bits`` the
    entropy of those pooled ratios; ``mean_*``: unweighted means over layers
    (``mean_effective_bits`` is the mean of per-layer bits). ``alpha_mean`` (alpha used in the
    last forward) and ``alpha_target_mean`` average the layers that have them. Values are ``None``
    when no layer qualifies.
    """
    rows: list[tuple[dict, int]] = []
    alphas: list[float] = []
    targets: list[float] = []
    for name, module in model.named_modules():
        get_stats = getattr(module, "get_last_stats", None)
        stats = get_stats() if callable(get_stats) else None
        if stats is None:
            continue
        if "num_weights" not in stats:
            label = name or type(module).__name__
            raise ValueError(f"{label}.get_last_stats() must report 'num_weights'")
        rows.append((stats, int(stats["num_weights"])))
        if stats.get("alpha") is not None:
            alphas.append(float(stats["alpha"]))
        if getattr(module, "alpha_target", None) is not None:
            targets.append(float(module.alpha_target))

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    total = sum(n for _, n in rows)
    out: dict[str, float | int | None] = {
        "num_ternary_layers": len(rows),
        "num_ternary_weights": total,
        "alpha_mean": mean(alphas),
        "alpha_target_mean": mean(targets),
    }
    for key in _RATIO_KEYS:
        out[f"mean_{key}"] = mean([float(s[key]) for s, _ in rows])
    pooled = [sum(s[k] * n for s, n in rows) / total if total else None for k in _RATIO_KEYS[:3]]
    out["global_zero_ratio"], out["global_plus_ratio"], out["global_minus_ratio"] = pooled
    out["global_effective_bits"] = _entropy(*pooled) if total else None
    return out
