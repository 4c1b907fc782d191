"""Models (``MODELS`` registry): ``build_model(name, input_shape, num_classes, **kwargs)``.

Built from ``nn.Linear`` / ``nn.Conv1d`` and activations only, so a converter can swap the
weight layers for ternary ones.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from chimera._validate import integer, require
from chimera.models.cnn import CNN1d
from chimera.models.mlp import MLP
from chimera.models.resmlp import ResMLP
from chimera.models.resnet import ChimeraResNet20, ResNet20, resnet20
from chimera.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "chimera.models")
MODELS.register("mlp")(MLP)
MODELS.register("cnn")(CNN1d)
MODELS.register("resmlp")(ResMLP)


@MODELS.register("resnet20")
def _resnet20(input_shape: tuple[int, ...], num_classes: int) -> ResNet20:
    """ResNet-20 for (channels, height, width) images; quantize it with the run's quantizer."""
    require(len(input_shape) == 3 and min(input_shape) >= 1, "input_shape", input_shape,
            "(channels, height, width) for resnet20")
    return resnet20(num_classes, in_channels=input_shape[0])


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """The model registered as ``name`` for ``input_shape`` inputs and ``num_classes`` logits."""
    require(len(input_shape) > 0, "input_shape", input_shape,
            "non-empty (the shape of one example)")
    num_classes = integer("num_classes", num_classes, 2)
    return MODELS.get(name)(tuple(input_shape), num_classes, **kwargs)


__all__ = ["MODELS", "CNN1d", "MLP", "ChimeraResNet20", "ResMLP", "ResNet20", "build_model",
           "resnet20"]
