"""Stress problems (docs/algorithms.md#tasks): small stochastic objectives that provoke optimizer
failure modes.

Every problem owns a ``torch.Generator`` seeded with ``seed``; each ``loss()`` call draws fresh
randomness from it, so the loss sequence is fixed by the seed. The model is
Linear(n_in, hidden) -> Tanh (ReLU for ``sparse_relu``) -> Linear(hidden, 1), initialised under
``torch.manual_seed(seed)`` in a forked RNG (the global RNG is left untouched). With
x ~ N(0, 1) of shape (batch, n_in), a teacher ``w_true`` ~ N(0, 1) drawn once from the generator
and eps ~ N(0, 1):

- ``regression``: columns 0, 3, 6, ... of x are zeroed (their first-layer weights never get a
  gradient); target y = x @ w_true + 0.05 * noise_scale * eps; loss MSE(model(x), y).
- ``sparse_relu``: x = relu(x) * [u > sparsity], u ~ U(0, 1); first-layer bias -0.75 (most ReLUs
  start dead); same target and loss.
- ``noisy_quadratic``: L = sum_p [0.5 * mean(p^2) + mean(p * xi_p)], xi_p ~ noise_scale * N(0, 1)
  fresh each call, over the model's parameters (the model is only a parameter container here).
- ``saddle``: the ``regression`` loss + 0.01 * sum_p mean(p^4 - p^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera._validate import integer, number
from chimera.registry import Registry


@dataclass(frozen=True)
class _Settings:
    seed: int
    batch: int
    n_in: int
    hidden: int
    noise_scale: float
    sparsity: float

    def __post_init__(self) -> None:
        for name in ("batch", "n_in", "hidden"):
            integer(name, getattr(self, name), 1)
        number("noise_scale", self.noise_scale, 0)
        number("sparsity", self.sparsity, 0, 1, high_open=True)


class StressProblem:
    """A model and a stochastic objective over it; ``loss()`` draws a fresh batch per call."""

    def __init__(self, name: str, model: nn.Module, objective: Callable[[], Tensor]) -> None:
        self.name = name
        self.model = model
        self._objective = objective

    def loss(self, step: int | None = None) -> Tensor:
        """The loss on a fresh draw. ``step`` is accepted for callers that count steps and is
        ignored: the draws depend only on the seed and on how many calls came before."""
        return self._objective()

    def __repr__(self) -> str:
        return f"StressProblem({self.name!r})"


STRESS: Registry[Callable[[_Settings], StressProblem]] = Registry("stress problem")


def make_stress_problem(
    name: str,
    *,
    seed: int = 0,
    batch: int = 64,
    n_in: int = 32,
    hidden: int = 64,
    noise_scale: float = 1.0,
    sparsity: float = 0.5,
) -> StressProblem:
    """Build the stress problem ``name`` (one of ``STRESS.names()``), deterministic in ``seed``."""
    factory = STRESS.get(name)
    return factory(_Settings(seed, batch, n_in, hidden, noise_scale, sparsity))


def _model(s: _Settings, activation: nn.Module) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        return nn.Sequential(nn.Linear(s.n_in, s.hidden), activation, nn.Linear(s.hidden, 1))


def _generator(s: _Settings) -> torch.Generator:
    return torch.Generator().manual_seed(s.seed)


def _regression_x(s: _Settings, gen: torch.Generator) -> Tensor:
    x = torch.randn(s.batch, s.n_in, generator=gen)
    x[:, ::3] = 0.0
    return x


def _sparse_relu_x(s: _Settings, gen: torch.Generator) -> Tensor:
    x = torch.randn(s.batch, s.n_in, generator=gen).relu()
    return x * (torch.rand(s.batch, s.n_in, generator=gen) > s.sparsity)


def _teacher_mse(
    s: _Settings,
    model: nn.Module,
    gen: torch.Generator,
    sample_x: Callable[[_Settings, torch.Generator], Tensor],
) -> Callable[[], Tensor]:
    """MSE(model(x), x @ w_true + 0.05 * noise_scale * eps) on a fresh x per call."""
    w_true = torch.randn(s.n_in, 1, generator=gen)

    def objective() -> Tensor:
        x = sample_x(s, gen)
        y = x @ w_true + 0.05 * s.noise_scale * torch.randn(s.batch, 1, generator=gen)
        return F.mse_loss(model(x), y)

    return objective


@STRESS.register("regression")
def _regression(s: _Settings) -> StressProblem:
    model = _model(s, nn.Tanh())
    return StressProblem("regression", model, _teacher_mse(s, model, _generator(s), _regression_x))


@STRESS.register("sparse_relu")
def _sparse_relu(s: _Settings) -> StressProblem:
    model = _model(s, nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-0.75)
    return StressProblem(
        "sparse_relu", model, _teacher_mse(s, model, _generator(s), _sparse_relu_x)
    )


@STRESS.register("noisy_quadratic")
def _noisy_quadratic(s: _Settings) -> StressProblem:
    model = _model(s, nn.Tanh())
    gen = _generator(s)

    def objective() -> Tensor:
        return sum(
            0.5 * p.square().mean()
            + (p * (s.noise_scale * torch.randn(p.shape, generator=gen))).mean()
            for p in model.parameters()
        )

    return StressProblem("noisy_quadratic", model, objective)


@STRESS.register("saddle")
def _saddle(s: _Settings) -> StressProblem:
    model = _model(s, nn.Tanh())
    mse = _teacher_mse(s, model, _generator(s), _regression_x)

    def objective() -> Tensor:
        return mse() + 0.01 * sum((p**4 - p**2).mean() for p in model.parameters())

    return StressProblem("saddle", model, objective)
