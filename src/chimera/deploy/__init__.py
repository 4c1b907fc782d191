"""Deployment of ternary models: packed inference layers (1.6 or 2 bits per weight) and one
safetensors file per model (docs/algorithms.md#packing-and-export)."""

from chimera.deploy.export import export_ternary, load_ternary, read_ternary
from chimera.deploy.packed import (
    PackedTernaryConv1d,
    PackedTernaryConv2d,
    PackedTernaryLinear,
    PackedTernaryModule,
)

__all__ = [
    "PackedTernaryConv1d",
    "PackedTernaryConv2d",
    "PackedTernaryLinear",
    "PackedTernaryModule",
    "export_ternary",
    "load_ternary",
    "read_ternary",
]
