"""Residual MLP (docs/algorithms.md#classification-tasks), the network of the learning-rule axis.

``h_0 = stem(x) = Linear(flatten(x))``, ``h_{l+1} = h_l + f_l(h_l)`` with the pre-LayerNorm
branch ``f_l(h) = W2 · GELU(W1 · LN(h))`` (hidden width ``mlp_ratio * d_hidden``), and
``y = head(h_L) = Linear(LN(h_L))``. The blocks hold only the branch ``f_l``; the residual add is
done by :meth:`ResMLP.forward` (or by a learning rule, which updates each block locally). Built
from ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.GELU`` only, so ``ternarize`` converts it.
PyTorch's default initialisation.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from chimera._validate import int_tuple, integer


class ResMLP(nn.Module):
    """``stem`` (flatten -> Linear), ``blocks`` (ModuleList of branches ``f_l``), ``head``.

    ``input_shape`` is the shape of one example; ``num_blocks`` may be 0 (stem -> head).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        d_hidden: int = 512,
        num_blocks: int = 12,
        mlp_ratio: int = 1,
    ) -> None:
        super().__init__()
        self.input_shape = int_tuple("input_shape", input_shape, 1, non_empty=True)
        num_classes = integer("num_classes", num_classes, 1)
        d_hidden = integer("d_hidden", d_hidden, 1)
        mlp_ratio = integer("mlp_ratio", mlp_ratio, 1)
        num_blocks = integer("num_blocks", num_blocks, 0)
        self.d_hidden = d_hidden
        width = mlp_ratio * d_hidden
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(self.input_shape), d_hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d_hidden), nn.Linear(d_hidden, width), nn.GELU(),
                          nn.Linear(width, d_hidden))
            for _ in range(num_blocks)
        )
        self.head = nn.Sequential(nn.LayerNorm(d_hidden), nn.Linear(d_hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """The full (backprop) forward: ``head(h_L)``."""
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)
