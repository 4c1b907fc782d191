"""Chimera: a PyTorch toolkit and benchmark harness for efficient and alternative training.

The library's public names (docs/api.md); the run layer is :mod:`chimera.run`, the harness
:mod:`chimera.bench`.
"""

__version__ = "0.1.0"

from chimera.data import (
    TASKS,
    VAL_FRACTION,
    TaskData,
    carve_validation,
    load_task,
    validation_indices,
)
from chimera.deploy import export_ternary, load_ternary, read_ternary
from chimera.models import MODELS, build_model
from chimera.nn import (
    QUANTIZERS,
    BitConv1d,
    BitConv2d,
    BitLinear,
    ChimeraConv2d,
    FloatConfig,
    IntTernaryConfig,
    IntTernaryConv1d,
    IntTernaryConv2d,
    IntTernaryLinear,
    QuantConfig,
    TernaryConfig,
    load_float_weights,
    quantize_,
    quantizer_config,
    ternarize,
)
from chimera.optim import (
    OPTIMIZERS,
    STAC,
    Chimera21,
    Lion,
    ScaledOptum,
    build_optimizer,
    optimizer_state_memory_bytes,
    optimizer_state_memory_summary,
    weight_decay_groups,
)
from chimera.quant import (
    SparseBranchController,
    TargetBitsController,
    ema_update,
    model_quant_stats,
    quantize_activations,
    quantize_weight_chimera,
    quantize_weight_strict_bitnet,
    ternary_stats,
)
from chimera.rules import RULES, FeedbackRule, alignment_angle, build_rule, credit_diagnostics

__all__ = [
    "MODELS",
    "OPTIMIZERS",
    "QUANTIZERS",
    "RULES",
    "TASKS",
    "VAL_FRACTION",
    "BitConv1d",
    "BitConv2d",
    "BitLinear",
    "Chimera21",
    "ChimeraConv2d",
    "FeedbackRule",
    "FloatConfig",
    "IntTernaryConfig",
    "IntTernaryConv1d",
    "IntTernaryConv2d",
    "IntTernaryLinear",
    "Lion",
    "QuantConfig",
    "STAC",
    "ScaledOptum",
    "SparseBranchController",
    "TargetBitsController",
    "TaskData",
    "TernaryConfig",
    "alignment_angle",
    "build_model",
    "build_optimizer",
    "build_rule",
    "carve_validation",
    "credit_diagnostics",
    "ema_update",
    "export_ternary",
    "load_float_weights",
    "load_task",
    "load_ternary",
    "model_quant_stats",
    "optimizer_state_memory_bytes",
    "optimizer_state_memory_summary",
    "quantize_",
    "quantize_activations",
    "quantize_weight_chimera",
    "quantize_weight_strict_bitnet",
    "quantizer_config",
    "read_ternary",
    "ternarize",
    "ternary_stats",
    "validation_indices",
    "weight_decay_groups",
    "__version__",
]
