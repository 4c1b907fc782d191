"""Quantizer configuration of a run: ``ternarize`` the model, drive the target-bits controller,
and collect model-level ternary statistics (SPEC 2.3 "Training integration")."""

from __future__ import annotations

import statistics
from typing import Any

from torch import nn

from chimera.nn.bit_layers import BitLayer
from chimera.nn.convert import TERNARY_CONVERTERS, ternarize
from chimera.quant.controller import TargetBitsController
from chimera.quant.stats import model_quant_stats

CONTROLLER_FREQUENCIES = ("epoch", "batch")
CONTROLLER_AFFECTS = ("alpha_target", "alpha_override")


def quantize_model(model: nn.Module, mode: str, quant_hparams: dict[str, Any]) -> nn.Module:
    """``ternarize(model, mode, skip=..., **layer_kwargs)``; ``quant_hparams`` holds ``skip``
    (default first and last layer) and the layer keyword arguments."""
    if mode != "fp32":
        TERNARY_CONVERTERS.get(mode)
    hp = dict(quant_hparams)
    skip = hp.pop("skip", ("first", "last"))
    return ternarize(model, mode, skip=tuple([skip] if isinstance(skip, str) else skip), **hp)


class AlphaControl:
    """Moves every Bit layer's alpha toward the target zero ratio (``TargetBitsController``).

    Config keys: ``frequency`` (epoch | batch), ``affects`` (alpha_target | alpha_override:
    the override also skips the warm-up), and the controller's own arguments.
    """

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        cfg = dict(config)
        self.frequency = cfg.pop("frequency", "epoch")
        self.affects = cfg.pop("affects", "alpha_target")
        if self.frequency not in CONTROLLER_FREQUENCIES:
            raise ValueError(f"controller frequency must be one of {CONTROLLER_FREQUENCIES}, "
                             f"got {self.frequency!r}")
        if self.affects not in CONTROLLER_AFFECTS:
            raise ValueError(f"controller affects must be one of {CONTROLLER_AFFECTS}, "
                             f"got {self.affects!r}")
        self.layers = [m for m in model.modules() if isinstance(m, BitLayer)]
        if not self.layers:
            raise ValueError("a controller needs a model with BitLinear/BitConv layers "
                             "(quantizer strict_bitnet or chimera)")
        self.controller = TargetBitsController(**cfg)
        self.alpha = statistics.fmean(m.alpha_target for m in self.layers)

    def update(self, model: nn.Module) -> None:
        """One controller step from the model's global (weighted) zero ratio of the last
        training forward."""
        zero_ratio = model_quant_stats(model)["global_zero_ratio"]
        self.alpha = self.controller.update(self.alpha, zero_ratio)
        for layer in self.layers:
            setattr(layer, self.affects, self.alpha)

    def record(self) -> dict[str, Any]:
        """Fields for the records: the controlled alpha and the last error."""
        return {"controller_alpha": self.alpha, "controller_error": self.controller.last_error,
                "controller_target_zero_ratio": self.controller.target_zero_ratio}


def quant_record(model: nn.Module) -> dict[str, Any]:
    """``model_quant_stats`` with a ``quant_`` prefix (empty for a model without ternary layers)."""
    stats = model_quant_stats(model)
    if not stats.get("num_ternary_layers"):
        return {}
    return {f"quant_{k}": v for k, v in stats.items()}
