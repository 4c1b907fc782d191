"""Optimizers: Chimera21, STAC, ScaledOptum, Lion, torch's baselines, one registry, state
accounting, weight-decay param groups."""

from chimera.optim.chimera21 import Chimera21
from chimera.optim.factory import OPTIMIZERS, build_optimizer, optimizer_hparam_names
from chimera.optim.lion import Lion
from chimera.optim.memory import optimizer_state_memory_bytes, optimizer_state_memory_summary
from chimera.optim.param_groups import NORM_MODULES, weight_decay_groups
from chimera.optim.scaled_optum import ScaledOptum, scaled_optum_state_bytes_per_weight
from chimera.optim.stac import STAC, LayerGroup, STACPartition, partition_trainable_layers

__all__ = [
    "NORM_MODULES",
    "OPTIMIZERS",
    "STAC",
    "Chimera21",
    "LayerGroup",
    "Lion",
    "STACPartition",
    "ScaledOptum",
    "build_optimizer",
    "optimizer_hparam_names",
    "optimizer_state_memory_bytes",
    "optimizer_state_memory_summary",
    "partition_trainable_layers",
    "scaled_optum_state_bytes_per_weight",
    "weight_decay_groups",
]
