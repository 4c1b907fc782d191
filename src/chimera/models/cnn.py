"""1-D CNN for sequences, after the MNIST-1D paper's ``ConvBase``.

Conv1d(c_in, C, 5, stride 2, pad 1) -> ReLU -> Conv1d(C, C, 3, 2, 1) -> ReLU
-> Conv1d(C, C, 3, 2, 1) -> ReLU -> flatten -> Linear(C * L_out, num_classes), where
L_out = floor((L + 2p - k) / s) + 1 applied layer by layer (length 40 -> 19 -> 10 -> 5).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from chimera._validate import integer, require

_CONVS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding) per layer


def output_length(length: int) -> int:
    """Sequence length after the three convolutions (< 1 means the input is too short)."""
    for kernel, stride, padding in _CONVS:
        length = (length + 2 * padding - kernel) // stride + 1
    return length


MIN_LENGTH = next(n for n in itertools.count(1) if output_length(n) >= 1)


class CNN1d(nn.Module):
    """Three strided convolutions and a linear head; input (N, L) or (N, c_in, L).

    ``input_shape`` is (L,) (one channel) or (c_in, L).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 25) -> None:
        super().__init__()
        channels = integer("channels", channels, 1)
        require(len(input_shape) in (1, 2), "input_shape", input_shape,
                "(length,) or (channels, length)")
        c_in, length = (1, *input_shape) if len(input_shape) == 1 else input_shape
        if output_length(length) < 1:
            raise ValueError(f"input length {length} is too short for cnn; minimum is {MIN_LENGTH}")
        layers: list[nn.Module] = []
        for kernel, stride, padding in _CONVS:
            layers += [nn.Conv1d(c_in, channels, kernel, stride, padding), nn.ReLU()]
            c_in = channels
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * output_length(length), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1) if x.dim() == 2 else x))
