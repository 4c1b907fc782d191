"""Ternary execution layers and the quantization API ``quantize_(model, config)``
(docs/algorithms.md#bit-layers, docs/algorithms.md#integer-ternary-layers)."""

from chimera.nn.bit_layers import (
    QUANT_MODES,
    BitConv1d,
    BitConv2d,
    BitLayer,
    BitLinear,
    ChimeraConv2d,
    load_float_weights,
)
from chimera.nn.int_ternary import (
    IntTernaryConv1d,
    IntTernaryConv2d,
    IntTernaryLinear,
    IntTernaryModule,
)
from chimera.nn.quantize import (
    QUANTIZERS,
    AlphaControl,
    FloatConfig,
    IntTernaryConfig,
    QuantConfig,
    TernaryConfig,
    quantize_,
    quantizer_config,
    ternarize,
)

__all__ = [
    "QUANTIZERS",
    "QUANT_MODES",
    "AlphaControl",
    "BitConv1d",
    "BitConv2d",
    "BitLayer",
    "BitLinear",
    "ChimeraConv2d",
    "FloatConfig",
    "IntTernaryConfig",
    "IntTernaryConv1d",
    "IntTernaryConv2d",
    "IntTernaryLinear",
    "IntTernaryModule",
    "QuantConfig",
    "TernaryConfig",
    "load_float_weights",
    "quantize_",
    "quantizer_config",
    "ternarize",
]
