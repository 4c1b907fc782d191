"""Run specifications: one run = (task, model, optimizer, quantizer, rule, seed, budget)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")  # bf16: torch.autocast(dtype=torch.bfloat16) around forward + loss
# Fields hashed into the run id only when they differ from these defaults, so that adding them
# left the ids of existing runs unchanged.
OPTIONAL_ID_FIELDS = {"precision": "fp32"}


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a training run; its ``run_id`` is derived from these fields."""

    task: str
    model: str
    optimizer: str
    seed: int = 0
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer_hparams: dict[str, Any] = field(default_factory=dict)
    model_hparams: dict[str, Any] = field(default_factory=dict)
    quantizer: str = "fp32"
    quant_hparams: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, Any] | None = None
    rule: str = "backprop"
    rule_hparams: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    log_every: int = 10
    lr_schedule: str = "constant"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.quantizer == "int_ternary" and self.optimizer != "scaled_optum":
            raise ValueError(
                "quantizer 'int_ternary' has no float weights and is trained by optimizer "
                f"'scaled_optum'; got optimizer {self.optimizer!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

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
