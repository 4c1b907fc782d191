"""``build_optimizer(name, model_or_params, **hparams)``: every optimizer of the toolkit by name.

STAC needs the model or its ``named_parameters()`` (it partitions the layers into trunk and cap)
and ScaledOptum registers the model's integer-ternary modules; the others take parameters or
param groups (e.g. ``weight_decay_groups(model, wd)``). The registry hides the difference: pass
a model to any of them.

torch's SGD, Adam and AdamW check ranges but let ±inf through, so their numbers (constructor
and param groups) are checked here first: finite ``lr``, ``momentum``, ``weight_decay``,
``eps`` >= 0, ``dampening`` in [0, 1], ``betas`` a pair in [0, 1) (numbers, not tensors).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from chimera._validate import known_keys, number, number_tuple
from chimera.optim.chimera21 import Chimera21
from chimera.optim.lion import Lion
from chimera.optim.scaled_optum import ScaledOptum
from chimera.optim.stac import STAC
from chimera.registry import Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry(
    "optimizer", "chimera.optimizers"
)

_BY_PARAMS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "lion": Lion,
    "chimera21": Chimera21,
}


_TORCH_CLASSES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_TORCH_NUMBERS = {"lr": (0, math.inf), "momentum": (0, math.inf), "dampening": (0, 1),
                  "weight_decay": (0, math.inf), "eps": (0, math.inf)}


def _check_torch_numbers(hparams: dict[str, Any], where: str = "") -> None:
    """The numbers of torch's optimizers (module docstring); ``where`` suffixes the names."""
    for key, (low, high) in _TORCH_NUMBERS.items():
        if key in hparams:
            number(key + where, hparams[key], low, high)
    if "betas" in hparams:
        number_tuple("betas" + where, hparams["betas"], 2, 0, 1, high_open=True)


def _params_factory(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    def build(model_or_params: nn.Module | Iterable, **hparams) -> torch.optim.Optimizer:
        if isinstance(model_or_params, nn.Module):
            model_or_params = model_or_params.parameters()
        if cls in _TORCH_CLASSES:
            _check_torch_numbers(hparams)
            model_or_params = list(model_or_params)
            for i, group in enumerate(model_or_params):
                if isinstance(group, dict):
                    _check_torch_numbers(group, f" (param group {i})")
        return cls(model_or_params, **hparams)

    build.__wrapped__ = cls  # type: ignore[attr-defined]  # for hyper-parameter checking
    return build


for _name, _cls in _BY_PARAMS.items():
    OPTIMIZERS.register(_name)(_params_factory(_cls))


@OPTIMIZERS.register("stac")
def _build_stac(model: nn.Module | Iterable, **hparams) -> STAC:
    return STAC(model, **hparams)


_build_stac.__wrapped__ = STAC  # type: ignore[attr-defined]


@OPTIMIZERS.register("scaled_optum")
def _build_scaled_optum(model_or_params: nn.Module | Iterable, **hparams) -> ScaledOptum:
    if isinstance(model_or_params, nn.Module):
        return ScaledOptum.for_model(model_or_params, **hparams)
    return ScaledOptum(model_or_params, **hparams)


_build_scaled_optum.__wrapped__ = ScaledOptum  # type: ignore[attr-defined]


def optimizer_hparam_names(name: str) -> list[str]:
    """Hyper-parameters the optimizer ``name`` accepts (its constructor's keyword arguments)."""
    factory = OPTIMIZERS.get(name)
    target = getattr(factory, "__wrapped__", factory)  # a plugin may register any callable
    return list(inspect.signature(target).parameters)[1:]  # all but the model / params


def build_optimizer(
    name: str, model_or_params: nn.Module | Iterable, **hparams
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``; unknown names or hyper-parameters raise
    ``ValueError`` listing what is allowed."""
    factory = OPTIMIZERS.get(name)
    allowed = optimizer_hparam_names(name)
    known_keys(f"optimizer '{name}'", hparams, allowed, "hyper-parameter")
    return factory(model_or_params, **hparams)
