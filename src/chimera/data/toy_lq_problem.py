"""The toy linear-quadratic problem of the learning-rule axis (docs/algorithms.md#toy-lq).

``h_0 = x ~ N(0, I_d)``, ``h_{l+1} = (I + W_l) h_l`` for l < L, ``y = C h_L``, target
``y* = A x``, loss ``ℓ = mean_batch ½||y − y*||²``. Generated from one seed: ``W_l`` entries
N(0, w_std²/d) (default w_std = 0.03), ``C`` and the teacher ``A`` entries N(0, 1/d).

Closed-form costates of the batch-mean loss: with ``M_l = (I + W_{L-1}) ··· (I + W_l)`` (so
``h_L = M_l h_l``, ``M_L = I``) and ``r = (C h_L − y*) / B``, ``λ_l = M_l^T C^T r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from chimera._validate import integer, number


def toy_lq_loss(y: Tensor, target: Tensor) -> Tensor:
    """``mean_batch ½||y − y*||²``."""
    return 0.5 * (y - target).pow(2).sum(-1).mean()


class LinearResNet(nn.Module):
    """Residual model of the toy: ``stem`` identity, ``blocks[l](h) = W_l h``, ``head(h) = C h``.
    The weights are fixed (``requires_grad=False``): the toy trains feedback networks only."""

    def __init__(self, weights: Tensor, readout: Tensor) -> None:
        super().__init__()
        num_layers, d, _ = weights.shape
        self.stem = nn.Identity()
        self.blocks = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(num_layers))
        self.head = nn.Linear(d, readout.shape[0], bias=False)
        with torch.no_grad():
            for block, w in zip(self.blocks, weights, strict=True):
                block.weight.copy_(w)
            self.head.weight.copy_(readout)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@dataclass(frozen=True)
class ToyLQ:
    """One generated problem: ``weights`` (L, d, d), ``readout`` C (m, d), ``teacher`` A (m, d)."""

    weights: Tensor
    readout: Tensor
    teacher: Tensor

    @property
    def dim(self) -> int:
        return self.weights.shape[1]

    @property
    def num_layers(self) -> int:
        return self.weights.shape[0]

    @property
    def out_dim(self) -> int:
        return self.readout.shape[0]

    def model(self) -> LinearResNet:
        """A fresh residual model with the problem's weights."""
        return LinearResNet(self.weights, self.readout)

    def sample(self, batch_size: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]:
        """A fresh batch ``(x, y* = A x)``."""
        batch_size = integer("batch_size", batch_size, 1)
        x = torch.randn(batch_size, self.dim, generator=generator)
        return x, x @ self.teacher.T

    def transfer(self, layer: int) -> Tensor:
        """``M_l = (I + W_{L-1}) ··· (I + W_l)``, the map from ``h_l`` to ``h_L``."""
        layer = integer("layer", layer, 0, self.num_layers)
        m = torch.eye(self.dim)
        for w in self.weights[layer:]:
            m = (torch.eye(self.dim) + w) @ m
        return m

    def costates(self, x: Tensor, target: Tensor) -> list[Tensor]:
        """Closed-form ``[λ_0, ..., λ_L]`` of the batch-mean loss: ``λ_l = M_l^T C^T r``."""
        r = (x @ self.transfer(0).T @ self.readout.T - target) / len(x)
        return [r @ self.readout @ self.transfer(l) for l in range(self.num_layers + 1)]


def make_toy_lq(seed: int = 0, *, dim: int = 64, num_layers: int = 12, out_dim: int = 10,
                w_std: float = 0.03) -> ToyLQ:
    """The toy problem generated from ``seed`` (docs/algorithms.md#toy-lq defaults)."""
    dim = integer("dim", dim, 1)
    num_layers = integer("num_layers", num_layers, 1)
    out_dim = integer("out_dim", out_dim, 1)
    number("w_std", w_std, 0)
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(dim)
    weights = torch.randn(num_layers, dim, dim, generator=g) * w_std * scale
    readout = torch.randn(out_dim, dim, generator=g) * scale
    teacher = torch.randn(out_dim, dim, generator=g) * scale
    return ToyLQ(weights, readout, teacher)
