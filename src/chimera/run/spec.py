"""Run specifications: one run = (task, model, optimizer, quantizer, rule, seed, budget).

Every default of a run lives here once: ``chimera train``'s options are generated from these
fields (their ``metadata`` holds the option's help), and suites fill the same fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from chimera.nn.quantize import QUANTIZERS, QuantConfig, quantizer_config
from chimera.rules import RULES

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")  # bf16: torch.autocast(dtype=torch.bfloat16) around forward + loss
# Fields hashed into the run id only when they differ from these defaults, so that adding them
# left the ids of existing runs unchanged.
OPTIONAL_ID_FIELDS = {"precision": "fp32"}
HPARAM_FIELDS = ("optimizer_hparams", "model_hparams", "quant_hparams", "rule_hparams")
DEVICE_TYPES = ("cpu", "cuda")


def check_device(value: str) -> str:
    """``value`` when it is ``cpu``, ``cuda`` or ``cuda:N`` as ``torch.device`` parses and prints
    it; a ``ValueError`` line otherwise (whether a GPU is present is checked when a run starts)."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if (device is None or str(device) != value or device.type not in DEVICE_TYPES
            or (device.type == "cpu" and device.index is not None)):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value


def _opt(help: str, flag: str | None = None) -> dict[str, Any]:
    """Field metadata for the command line: the option's help and, when it differs from the
    field name, its flag."""
    return {"help": help, "flag": flag}


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a training run; its ``run_id`` is derived from these fields."""

    task: str = field(default="mnist1d", metadata=_opt("registered task (`chimera list`)"))
    model: str = field(default="cnn", metadata=_opt("registered model (`chimera list`)"))
    optimizer: str = field(default="adamw", metadata=_opt("registered optimizer"))
    seed: int = field(default=0, metadata=_opt("one or more seeds, one run each"))
    epochs: int = field(default=10, metadata=_opt("passes over the training split"))
    batch_size: int = field(default=128, metadata=_opt("training batch size"))
    eval_batch_size: int = field(default=1000, metadata=_opt("evaluation batch size"))
    optimizer_hparams: dict[str, Any] = field(
        default_factory=dict,
        metadata=_opt("optimizer hyper-parameter KEY=VALUE (repeatable)", "--opt-arg"))
    model_hparams: dict[str, Any] = field(
        default_factory=dict, metadata=_opt("model argument KEY=VALUE (repeatable)", "--model-arg"))
    quantizer: str = field(default="fp32", metadata=_opt(
        f"{' | '.join(QUANTIZERS.names())} (int_ternary trains with --optimizer scaled_optum)"))
    quant_hparams: dict[str, Any] = field(default_factory=dict, metadata=_opt(
        'quantizer argument, e.g. alpha_target=0.7, skip=["first"] (repeatable)', "--quant-arg"))
    controller: dict[str, Any] | None = field(default=None, metadata=_opt(
        "enables the target-bits controller: target_bits=1.32, branch=sparse, "
        "frequency=epoch|batch, affects=alpha_target|alpha_override, ...", "--controller-arg"))
    rule: str = field(default="backprop", metadata=_opt(
        f"{' | '.join(RULES.names())} (rules but backprop need a residual model, e.g. --model "
        "resmlp)"))
    rule_hparams: dict[str, Any] = field(default_factory=dict, metadata=_opt(
        "learning-rule hyper-parameter, e.g. K=4, warmup_frac=0.2 (repeatable)", "--rule-arg"))
    device: str = field(default="cpu", metadata=_opt("cpu | cuda | cuda:N"))
    log_every: int = field(default=10, metadata=_opt("steps between step records"))
    lr_schedule: str = field(default="constant", metadata=_opt(
        "constant | cosine (per step, to 0)"))
    precision: str = field(default="fp32", metadata=_opt(
        "fp32 | bf16 (torch.autocast to bfloat16 around forward and loss)"))

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        check_device(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in HPARAM_FIELDS:
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a table of hyper-parameters, "
                                 f"got {getattr(self, name)!r}")
        if self.controller is not None and not isinstance(self.controller, dict):
            raise ValueError(f"controller must be a table or None, got {self.controller!r}")
        needs = self.quant_config.requires_optimizer
        if needs is not None and self.optimizer != needs:
            raise ValueError(
                f"quantizer {self.quantizer!r} has no float weights and is trained by optimizer "
                f"{needs!r}; got optimizer {self.optimizer!r}"
            )

    @property
    def quant_config(self) -> QuantConfig:
        """The quantizer config of the run (validated: bad names or values raise here)."""
        return quantizer_config(self.quantizer, **self.quant_hparams)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able data."""
        return dataclasses.asdict(self)

    @property
    def config_id(self) -> str:
        """Identity of the configuration: every field but the seed (its seeds share it); the
        ``OPTIONAL_ID_FIELDS`` count only when they differ from their default."""
        d = self.to_dict()
        d.pop("seed")
        for name, default in OPTIONAL_ID_FIELDS.items():
            if d[name] == default:
                d.pop(name)
        digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.task}-{self.model}-{self.optimizer}-{digest}"

    @property
    def run_id(self) -> str:
        """Deterministic name of the run: the configuration id plus the seed."""
        return f"{self.config_id}-s{self.seed}"
