"""ResNet-20 for 32x32 images (docs/algorithms.md#resnet-20) and its ternary versions via
``ternarize``.

conv3x3(3 -> 16) -> BN -> ReLU -> 3 stages x 3 BasicBlocks (16, 32, 64 channels; the first block
of stages 2 and 3 has stride 2) -> global average pool -> linear. BasicBlock: conv3x3 -> BN ->
ReLU -> conv3x3 -> BN, plus the shortcut (1x1 conv + BN where the shape changes), ReLU.
Convolutions have no bias; 272,474 parameters for 10 classes. PyTorch's default initialisation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from chimera._validate import choice, integer, require
from chimera.nn.quantize import POSITIONAL_SKIPS, ternarize

RESNET_MODES = ("fp32_baseline", "strict_bitnet", "chimera", "int_ternary")


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            *_conv_bn(c_in, c_out, 3, stride), nn.ReLU(inplace=True), *_conv_bn(c_out, c_out, 3, 1)
        )
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (2016) with projection shortcuts."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        num_classes = integer("num_classes", num_classes, 1)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(3):
                blocks.append(BasicBlock(c_in, width, stride=2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.stem = nn.Sequential(*_conv_bn(in_channels, 16, 3, 1), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet20:
    """A float ResNet-20 (272,474 parameters for 10 classes and RGB input)."""
    return ResNet20(num_classes, in_channels)


class ChimeraResNet20(ResNet20):
    """ResNet-20 with every conv/linear layer converted by ``ternarize(self, mode, ...)``.

    ``mode="fp32_baseline"`` converts nothing; ``first_last_fp32`` keeps the stem convolution and
    the classifier in fp32; ``quant_config`` holds the keyword arguments of the mode's layers.
    ``mode`` is a quantizer name (its config is looked up in ``QUANTIZERS`` when the model is
    built).
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
