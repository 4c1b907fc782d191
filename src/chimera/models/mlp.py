"""Multi-layer perceptron: flatten -> [Linear -> ReLU] x depth -> Linear(num_classes)."""

from __future__ import annotations

import math

from torch import nn

from chimera._validate import integer


class MLP(nn.Sequential):
    """``depth`` hidden layers of width ``hidden`` (the MNIST-1D paper's MLP: 2 x 100)."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 100, depth: int = 2
    ) -> None:
        hidden = integer("hidden", hidden, 1)
        depth = integer("depth", depth, 0)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
