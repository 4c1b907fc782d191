"""Quantizer math without modules: weight and activation quantizers, ternary statistics and
effective bits, the target-bits controller, and ternary packing
(docs/algorithms.md#quantizers-and-ternary-layers)."""

from chimera.quant.controller import SparseBranchController, TargetBitsController
from chimera.quant.functions import (
    ACT_QUANT_MODES,
    STAT_MODES,
    abs_stat,
    ema_update,
    quantize_activations,
    quantize_weight_chimera,
    quantize_weight_strict_bitnet,
)
from chimera.quant.packing import (
    FORMATS,
    PackedTernary,
    pack_ternary,
    packed_from_tensors,
    packed_to_tensors,
    unpack_ternary,
)
from chimera.quant.stats import (
    BRANCHES,
    MAX_TERNARY_BITS,
    entropy_from_ternary_ratios,
    model_quant_stats,
    stats_from_counts,
    symmetric_zero_ratio_for_entropy,
    ternary_counts,
    ternary_stats,
)

__all__ = [
    "ACT_QUANT_MODES",
    "BRANCHES",
    "FORMATS",
    "MAX_TERNARY_BITS",
    "STAT_MODES",
    "PackedTernary",
    "SparseBranchController",
    "TargetBitsController",
    "abs_stat",
    "ema_update",
    "entropy_from_ternary_ratios",
    "model_quant_stats",
    "pack_ternary",
    "packed_from_tensors",
    "packed_to_tensors",
    "quantize_activations",
    "quantize_weight_chimera",
    "quantize_weight_strict_bitnet",
    "stats_from_counts",
    "symmetric_zero_ratio_for_entropy",
    "ternary_counts",
    "ternary_stats",
    "unpack_ternary",
]
