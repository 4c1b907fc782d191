"""ResNet-20 for 32x32 images (docs/algorithms.md#resnet-20) and its ternary versions via
``ternarize``.

conv1 (3x3, 3 -> 16) -> bn1 -> ReLU -> layer1..layer3, 3 BasicBlocks each (16, 32, 64 channels;
the first block of layer2 and layer3 has stride 2) -> avgpool (global) -> fc. BasicBlock: conv1
(3x3) -> bn1 -> ReLU -> conv2 (3x3) -> bn2, plus the shortcut (1x1 conv + BN where the shape
changes), ReLU. The names are the original project's, so its checkpoints load.
Convolutions have no bias; 272,474 parameters for 10 classes. PyTorch's default initialisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from chimera._validate import choice, integer, require
from chimera.nn.quantize import POSITIONAL_SKIPS, ternarize

RESNET_MODES = ("fp32_baseline", "strict_bitnet", "chimera", "int_ternary")


def _conv(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is
    ``Sequential(conv1x1, BN)`` where the shape changes, else the identity."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, c_out, 3, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(c_out, c_out, 3, 1)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(_conv(c_in, c_out, 1, stride),
                                                     nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Three blocks; the first one changes the width and applies ``stride``."""
    return nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out),
                         BasicBlock(c_out, c_out))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (2016) with projection shortcuts. Module names follow
    the original project's ``ChimeraResNet20`` (``conv1``, ``bn1``, ``layer1``-``layer3`` of
    blocks ``conv1``/``bn1``/``conv2``/``bn2``/``shortcut``, ``avgpool``, ``fc``), so its float
    checkpoints load with ``load_state_dict``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        num_classes = integer("num_classes", num_classes, 1)
        self.conv1 = _conv(in_channels, 16, 3, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, 1)
        self.layer2 = _stage(16, 32, 2)
        self.layer3 = _stage(32, 64, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The last stage's output, (N, 64, H/4, W/4)."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet20:
    """A float ResNet-20 (272,474 parameters for 10 classes and RGB input)."""
    return ResNet20(num_classes, in_channels)


class ChimeraResNet20(ResNet20):
    """ResNet-20 with every conv/linear layer converted by ``ternarize(self, mode, ...)``.

    ``mode="fp32_baseline"`` converts nothing; ``first_last_fp32`` keeps ``conv1`` and ``fc``
    in fp32; ``quant_config`` holds the keyword arguments of the mode's layers. ``mode`` is a
    quantizer name (its config is looked up in ``QUANTIZERS`` when the model is built).
    """

    def __init__(
        self,
        num_classes: int = 10,
        mode: str = "chimera",
        quant_config: dict[str, Any] | None = None,
        first_last_fp32: bool = False,
    ) -> None:
        super().__init__(num_classes)
        self.mode = choice("mode", mode, RESNET_MODES)
        require(quant_config is None or isinstance(quant_config, dict), "quant_config",
                quant_config, "a dict or None")
        if mode != "fp32_baseline":
            skip = POSITIONAL_SKIPS if first_last_fp32 else ()
            ternarize(self, mode, skip=skip, **(quant_config or {}))
