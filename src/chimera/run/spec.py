"""Run specifications: one run = (task, model, optimizer, quantizer, rule, seed, budget).

Every default of a run lives here once: ``chimera train``'s options are generated from these
fields (their ``metadata`` holds the option's help), and suites fill the same fields.

A spec validates itself when built, so every caller (``chimera train``, suites, the library) gets
the same one-line ``ValueError`` before anything runs: registered names, the budget, plain JSON
hyper-parameter tables without NaN or infinity, the optimizer's and the rule's hyper-parameter
names, the optimizer's against the types its constructor declares, the quantizer's arguments, and
settings that do not apply (rule arguments for ``backprop``, a controller without Bit layers,
``fp32`` arguments). What only building the objects reveals is checked by
:func:`chimera.run.build.probe_run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError

from chimera._validate import fail, known_keys, require
from chimera.data import TASKS
from chimera.models import MODELS
from chimera.nn.quantize import (
    QUANTIZERS,
    QuantConfig,
    controllable_quantizers,
    controller_settings,
    quantizer_config,
)
from chimera.optim import OPTIMIZERS, optimizer_hparam_names
from chimera.rules import RULES

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")  # bf16: torch.autocast(dtype=torch.bfloat16) around forward + loss
# Fields hashed into the run id only when they differ from these defaults, so that adding them
# left the ids of existing runs unchanged.
OPTIONAL_ID_FIELDS = {"precision": "fp32", "max_batches": None, "eval_max_batches": None}
HPARAM_FIELDS = ("optimizer_hparams", "model_hparams", "quant_hparams", "rule_hparams")
DEVICE_TYPES = ("cpu", "cuda")
MAX_COUNT = 2**31 - 1  # epochs, batch sizes, batch limits, log_every
# the quantizers whose runs get the target-bits controller when ``controller`` is None (as in the
# original project, whose chimera mode always ran it)
CONTROLLED_BY_DEFAULT = ("chimera",)
MAX_SEED = 2**32 - 1  # what every RNG of the run accepts


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


def check_plain_table(name: str, value: Any) -> None:
    """``value`` is plain JSON data (tables with string keys, lists, strings, booleans, None,
    finite numbers), as records and run ids need; otherwise one line naming the key, e.g.
    ``optimizer_hparams.lr must be a finite number, got inf`` (with ``name`` "", the keys are
    named from the table's top)."""
    if isinstance(value, dict):
        for key, item in value.items():
            require(isinstance(key, str), f"{name} key", key, "a string")
            check_plain_table(f"{name}.{key}" if name else key, item)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain_table(f"{name}.{i}" if name else str(i), item)
    elif isinstance(value, float):
        require(math.isfinite(value), name, value, "a finite number")
    elif not (value is None or isinstance(value, str | int)):
        fail(name, value, "plain data (a number, string, boolean, null, list or table)")


def _type_text(annotation: Any) -> str:
    generic = bool(typing.get_args(annotation))
    text = str(annotation) if generic else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "").replace("torch.Tensor", "Tensor")


@functools.cache
def _optimizer_types(name: str) -> dict[str, tuple[TypeAdapter, str]]:
    """``{hyper-parameter: (strict validator, type text)}`` from the annotations of the
    optimizer's constructor (hyper-parameters without a checkable annotation are left out)."""
    cls = OPTIMIZERS.get(name).__wrapped__
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not resolve at runtime: names only
        return {}
    config = ConfigDict(strict=True, arbitrary_types_allowed=True)
    types = {}
    for key in optimizer_hparam_names(name):
        if key in hints:  # an annotation pydantic cannot check is left out
            with contextlib.suppress(Exception):
                types[key] = (TypeAdapter(hints[key], config=config), _type_text(hints[key]))
    return types


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def check_optimizer_hparams(name: str, hparams: dict[str, Any]) -> None:
    """``hparams`` are keyword arguments of the optimizer ``name``, of the types its constructor
    declares (strictly: no string for a number, no number for a boolean; lists stand for
    tuples); one ``ValueError`` line naming the hyper-parameter otherwise. Values are checked by
    the optimizer itself when it is built."""
    known_keys(f"optimizer '{name}'", hparams, optimizer_hparam_names(name), "hyper-parameter")
    types = _optimizer_types(name)
    for key, value in hparams.items():
        if key in types:
            adapter, text = types[key]
            try:
                adapter.validate_python(_as_tuples(value))
            except ValidationError:
                fail(f"optimizer '{name}' hyper-parameter {key}", value, f"of type {text}")


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
    controller: dict[str, Any] | bool | None = field(default=None, metadata=_opt(
        "target-bits controller setting: target_bits=1.32, branch=sparse, frequency=epoch|batch, "
        "affects=alpha_target|alpha_override, ... (on by default for quantizer chimera; "
        "--no-controller turns it off)", "--controller-arg"))
    rule: str = field(default="backprop", metadata=_opt(
        f"{' | '.join(RULES.names())} (state_bridge and credit_bridge need a residual model, "
        "e.g. --model resmlp; the others work on any Linear/Conv model)"))
    rule_hparams: dict[str, Any] = field(default_factory=dict, metadata=_opt(
        "learning-rule hyper-parameter, e.g. K=4, warmup_frac=0.2 (repeatable)", "--rule-arg"))
    device: str = field(default="cpu", metadata=_opt("cpu | cuda | cuda:N"))
    log_every: int = field(default=10, metadata=_opt("steps between step records"))
    lr_schedule: str = field(default="constant", metadata=_opt(
        "constant | cosine (per step, to 0)"))
    precision: str = field(default="fp32", metadata=_opt(
        "fp32 | bf16 (torch.autocast to bfloat16 around forward and loss)"))
    max_batches: int | None = field(default=None, metadata=_opt(
        "training batches per epoch at most (none: the whole split)"))
    eval_max_batches: int | None = field(default=None, metadata=_opt(
        "evaluation batches at most (none: the whole test split)"))

    def __post_init__(self) -> None:
        """Validate every field (see the module docstring): one ``ValueError`` line."""
        self._check_budget()
        for registry, name in ((TASKS, self.task), (MODELS, self.model),
                               (OPTIMIZERS, self.optimizer), (RULES, self.rule)):
            registry.get(name)
        for name in HPARAM_FIELDS:
            require(isinstance(getattr(self, name), dict), name, getattr(self, name),
                    "a table of hyper-parameters")
            check_plain_table(name, getattr(self, name))
        check_optimizer_hparams(self.optimizer, self.optimizer_hparams)
        self._check_rule()
        self._check_quantizer()

    def _check_budget(self) -> None:
        """Epochs, batch sizes, logging, seed, schedule, device and precision."""
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int)
                    or not 1 <= value <= MAX_COUNT):
                raise ValueError(f"{name} must be a positive integer (at most {MAX_COUNT}), "
                                 f"got {value!r}")
        for name in ("max_batches", "eval_max_batches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= MAX_COUNT):
                raise ValueError(f"{name} must be a positive integer (at most {MAX_COUNT}) or "
                                 f"None, got {value!r}")
        if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be a non-negative integer (at most {MAX_SEED}), "
                             f"got {self.seed!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        check_device(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def _check_rule(self) -> None:
        """Rule hyper-parameter names; ``backprop`` (run inline by the trainer) takes none."""
        if self.rule == "backprop" and self.rule_hparams:
            raise ValueError(f"rule 'backprop' takes no rule_hparams, got {self.rule_hparams}")
        known_keys(f"rule '{self.rule}'", self.rule_hparams, RULES.get(self.rule).hparam_names,
                   "hyper-parameter")

    def _check_quantizer(self) -> None:
        """The quantizer's arguments, the optimizer it requires, and the controller (a table,
        ``False`` or None): settings that exist and a quantizer with Bit layers for it to
        drive."""
        config = self.quant_config
        needs = config.requires_optimizer
        if needs is not None and self.optimizer != needs:
            raise ValueError(
                f"quantizer {self.quantizer!r} has no float weights and is trained by optimizer "
                f"{needs!r}; got optimizer {self.optimizer!r}"
            )
        if self.controller is None or self.controller is False:
            return
        require(isinstance(self.controller, dict), "controller", self.controller,
                "a table of settings, false (off) or None (the quantizer's default)")
        check_plain_table("controller", self.controller)
        if not config.controllable:
            raise ValueError(
                f"a controller needs a quantizer with BitLinear/BitConv layers "
                f"({' or '.join(controllable_quantizers())}), got quantizer {self.quantizer!r}")
        controller_settings(self.controller)

    @functools.cached_property
    def quant_config(self) -> QuantConfig:
        """The quantizer config of the run (validated: bad names or values raise here); built
        once per spec."""
        return quantizer_config(self.quantizer, **self.quant_hparams)

    @property
    def controller_config(self) -> dict[str, Any] | None:
        """The controller the run uses: the ``controller`` table; with None, the default
        controller (``{}``) for the quantizers of ``CONTROLLED_BY_DEFAULT`` and none otherwise;
        with ``False``, none."""
        if self.controller is None:
            return {} if self.quantizer in CONTROLLED_BY_DEFAULT else None
        return None if self.controller is False else self.controller

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able data."""
        return dataclasses.asdict(self)

    @property
    def config_id(self) -> str:
        """Identity of the configuration: every field but the seed (its seeds share it), with the
        controller the run uses (:attr:`controller_config`: a default controller and its
        explicit ``{}`` share an id, as do ``False`` and no controller); the
        ``OPTIONAL_ID_FIELDS`` count only when they differ from their default."""
        d = self.to_dict()
        d.pop("seed")
        d["controller"] = self.controller_config
        for name, default in OPTIONAL_ID_FIELDS.items():
            if d[name] == default:
                d.pop(name)
        digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.task}-{self.model}-{self.optimizer}-{digest}"

    @property
    def run_id(self) -> str:
        """Deterministic name of the run: the configuration id plus the seed."""
        return f"{self.config_id}-s{self.seed}"
