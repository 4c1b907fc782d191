"""The suite schema (docs/suites.md): the typed tables of a suite file and its one entry point,
:func:`load_suite`.

A suite is a TOML file (or the same data as a dict): a top-level table holding one grid, or
defaults for several ``[[grid]]`` tables, plus optional ``[stress]`` and ``[toy_lq]`` tables.
Every table is a pydantic model with strict types and no unknown keys; registry names, devices,
seeds and the model hyper-parameters (against the model factory's signature and annotations) are
checked here, and :mod:`chimera.bench.suite.expand` then expands the grids into run specs and
probe-builds every configuration. Any problem is one ``ValueError`` line naming the file, the
table and the key, before anything runs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)

from chimera._validate import known_keys
from chimera.bench.jobs.stress import DEFAULT_OPTIONS, STRESS_CONFIGS, StressOptions
from chimera.bench.jobs.toy_lq import DEFAULT_VARIANTS, TOY_VARIANTS
from chimera.bench.suite.expand import expand, grid_label
from chimera.bench.suite.sections import TUNE_METRICS, TUNE_SAMPLERS, Suite
from chimera.data import TASKS
from chimera.data.stress_problems import STRESS
from chimera.models import MODELS
from chimera.nn.quantize import QUANTIZERS
from chimera.optim import OPTIMIZERS
from chimera.registry import Registry
from chimera.rules import RULES
from chimera.run.spec import (
    HPARAM_FIELDS,
    LR_SCHEDULES,
    PRECISIONS,
    check_device,
    check_plain_table,
)

SECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# what a suite writes beside its grid folders (docs/suites.md)
RESERVED_NAMES = ("checkpoints", "summary.md", "stress.jsonl", "toy_lq.jsonl", "report.md",
                  "report.csv", "learning_curves.png", "accuracy_vs_bits.png",
                  "step_time_vs_memory.png", "tuning_sensitivity.png")
NAME_TAG, TABLE_TAG = "<name>", "<table>"  # union tags, left out of error locations
LIST_TAG, RANGE_TAG = "<list>", "<range>"
MODEL_ARGS = ("input_shape", "num_classes")  # given by the task, not by model_hparams


# --- value checks ------------------------------------------------------------------------------

def _registered(registry: Registry) -> AfterValidator:
    """A name of ``registry`` (the error lists the known names)."""

    def check(name: str) -> str:
        registry.get(name)
        return name

    return AfterValidator(check)


def _distinct(values: list[Any]) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"entries must be distinct, got {values!r}")
    return values


def _finite_table(table: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameter tables are plain data with no NaN or infinity (the run spec's check)."""
    check_plain_table("", table)
    return table


def _tune_address(key: str) -> str:
    """``KEY`` (an optimizer hyper-parameter) or ``TABLE.KEY`` with TABLE a hyper-parameter
    table of the run spec."""
    table, _, name = key.rpartition(".")
    if not name or (table and table not in HPARAM_FIELDS) or "." in table:
        raise ValueError(f"a tuned key is KEY (an optimizer hyper-parameter) or TABLE.KEY with "
                         f"TABLE one of {', '.join(HPARAM_FIELDS)}, got {key!r}")
    return key


def _candidates(values: list[Any]) -> list[Any]:
    """Distinct plain values without NaN or infinity."""
    for value in values:
        check_plain_table("candidate", value)
    texts = [json.dumps(v, sort_keys=True) for v in values]
    if len(set(texts)) != len(texts):
        raise ValueError(f"candidates must be distinct, got {values!r}")
    return values


def _section_name(name: str) -> str:
    if not SECTION_NAME.fullmatch(name):
        raise ValueError(f"a [[grid]] name starts with a letter or digit, then letters, digits, "
                         f"'_', '.', '-' (it names the output folder), got {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"a [[grid]] name must not be one of the suite's own files or folders "
                         f"({', '.join(RESERVED_NAMES)}), got {name!r}")
    return name


def _registered_name(registry: Registry) -> Any:
    """A name of ``registry``."""
    return Annotated[str, _registered(registry)]


def _registered_names(registry: Registry) -> Any:
    """A non-empty list of distinct names of ``registry``."""
    return Annotated[list[_registered_name(registry)], Field(min_length=1),
                     AfterValidator(_distinct)]


def _entry_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return NAME_TAG
    return TABLE_TAG if isinstance(value, dict | BaseModel) else None


def _entries(registry: Registry, table: type[BaseModel], what: str) -> Any:
    """A non-empty list whose items are names of ``registry`` or ``table`` tables."""
    item = Annotated[
        Annotated[_registered_name(registry), Tag(NAME_TAG)] | Annotated[table, Tag(TABLE_TAG)],
        Discriminator(_entry_kind, custom_error_type="entry_type",
                      custom_error_message=f"must be a name or a table {what}"),
    ]
    return Annotated[list[item], Field(min_length=1)]


PositiveInt = Annotated[int, Field(ge=1)]
Seeds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1),
                  AfterValidator(_distinct)]
Hparams = Annotated[dict[str, Any], AfterValidator(_finite_table)]


def _range_or_list(value: Any) -> str | None:
    if isinstance(value, list):
        return LIST_TAG
    return RANGE_TAG if isinstance(value, dict | BaseModel) else None


def _false_or(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    return False if value is False else handler(value)


# a table of controller settings, or false: no controller (not even a quantizer's default)
Controller = Annotated[Hparams | None, WrapValidator(_false_or)]
Device = Annotated[str, AfterValidator(check_device)]
SectionName = Annotated[str, AfterValidator(_section_name)]


# --- tables ------------------------------------------------------------------------------------

class _Table(BaseModel):
    """Strict types, no unknown keys (the error lists the allowed ones)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            known_keys("", data, list(cls.model_fields))
        return data


class _NamedEntry(_Table):
    """``{name = "...", <hyper-parameters>}``: an optimizer or learning rule with its own
    hyper-parameters."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: str

    @model_validator(mode="after")
    def _finite_hparams(self) -> _NamedEntry:
        _finite_table(self.hparams)
        return self

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerEntry(_NamedEntry):
    """An entry of ``optimizers``: ``{name = "sgd", lr = 0.1, momentum = 0.9}``."""

    name: _registered_name(OPTIMIZERS)


class RuleEntry(_NamedEntry):
    """An entry of ``rules``: ``{name = "state_bridge", K = 8}``."""

    name: _registered_name(RULES)


class QuantizerEntry(_Table):
    """A ``[[quantizers]]`` table: a quantizer with its arguments and controller."""

    quantizer: _registered_name(QUANTIZERS)
    quant_hparams: Hparams = Field(default_factory=dict)
    controller: Controller = None


OptimizerList = _entries(OPTIMIZERS, OptimizerEntry, "{name, <hyper-parameters>}")
QuantizerList = _entries(QUANTIZERS, QuantizerEntry, "{quantizer, quant_hparams, controller}")
RuleList = _entries(RULES, RuleEntry, "{name, <hyper-parameters>}")


class GridFields(_Table):
    """The keys of one grid: its axes (a choice or a list, with their hyper-parameters), seeds
    and budget. Unset keys are None (the top-level value, or the RunSpec default)."""

    name: str | None = None
    title: str | None = None
    task: _registered_name(TASKS) | None = None
    tasks: _registered_names(TASKS) | None = None
    model: _registered_name(MODELS) | None = None
    models: _registered_names(MODELS) | None = None
    model_hparams: Hparams | None = None
    optimizer: _registered_name(OPTIMIZERS) | None = None
    optimizers: OptimizerList | None = None
    optimizer_hparams: Hparams | None = None
    quantizer: _registered_name(QUANTIZERS) | None = None
    quantizers: QuantizerList | None = None
    quant_hparams: Hparams | None = None
    controller: Controller = None
    rule: _registered_name(RULES) | None = None
    rules: RuleList | None = None
    rule_hparams: Hparams | None = None
    seeds: Seeds | None = None
    epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    eval_batch_size: PositiveInt | None = None
    lr_schedule: Literal[LR_SCHEDULES] | None = None
    device: Device | None = None
    log_every: PositiveInt | None = None
    precision: Literal[PRECISIONS] | None = None
    max_batches: PositiveInt | None = None
    eval_max_batches: PositiveInt | None = None

    @field_validator("model_hparams")
    @classmethod
    def _model_hparams_fit(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The keys and types of ``model_hparams`` against every model of the table."""
        models = [info.data["model"]] if info.data.get("model") else info.data.get("models")
        for model in models or ():
            check_model_hparams(model, value)
        return value

    def set_fields(self) -> dict[str, Any]:
        """The grid keys this table sets (``name``, ``title`` and the top level's sections
        excepted)."""
        return {k: getattr(self, k) for k in GridFields.model_fields
                if k in self.model_fields_set and k not in ("name", "title")
                and getattr(self, k) is not None}


class GridTable(GridFields):
    """A ``[[grid]]`` table: a named grid; unset keys come from the top level, by groups."""

    name: SectionName


class StressTable(_Table):
    """``[stress]``: stress problems x optimizer configurations (``chimera stress``)."""

    title: str = "Stress problems"
    seeds: Seeds | None = None
    steps: PositiveInt = 300
    problems: _registered_names(STRESS) = Field(default_factory=STRESS.names)
    configs: _registered_names(STRESS_CONFIGS) = Field(default_factory=STRESS_CONFIGS.names)
    batch_size: PositiveInt = DEFAULT_OPTIONS.batch_size
    in_features: PositiveInt = DEFAULT_OPTIONS.in_features
    hidden_features: PositiveInt = DEFAULT_OPTIONS.hidden_features
    noise_scale: float = DEFAULT_OPTIONS.noise_scale
    sparsity: float = DEFAULT_OPTIONS.sparsity
    lr: float | dict[str, float] | None = None
    timing_warmup_steps: Annotated[int, Field(ge=0)] = DEFAULT_OPTIONS.timing_warmup_steps
    diag_every: PositiveInt = DEFAULT_OPTIONS.diag_every

    @model_validator(mode="after")
    def _options_valid(self) -> StressTable:
        self.options()
        return self

    def options(self) -> StressOptions:
        """The table's :class:`~chimera.bench.jobs.stress.StressOptions` (validated)."""
        return StressOptions(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(StressOptions)})


class ToyLQTable(_Table):
    """``[toy_lq]``: the learning rules' credit quality on the toy LQ (``chimera toy-lq``)."""

    title: str = "Toy LQ credit quality"
    seeds: Seeds | None = None
    steps: PositiveInt = 8000
    rules: _registered_names(TOY_VARIANTS) = Field(default_factory=lambda: list(DEFAULT_VARIANTS))


class ResourcesTable(_Table):
    """``[resources]``: what each run asks of an executor that places runs (``--executor
    ray``): CPUs (> 0, also its torch threads) and GPUs (>= 0, fractions allowed)."""

    num_cpus: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    num_gpus: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


class SuiteTable(GridFields):
    """The top level: one grid, or the defaults of its ``[[grid]]`` tables (and the seeds of
    ``[stress]`` and ``[toy_lq]``), what ``chimera tune`` searches (``[tune]``) and what each
    run needs on a cluster (``[resources]``)."""

    grid: Annotated[list[GridTable], Field(min_length=1)] | None = None
    stress: StressTable | None = None
    toy_lq: ToyLQTable | None = None
    tune: TuneTable | None = None
    resources: ResourcesTable | None = None


Bound = Annotated[float, Field(allow_inf_nan=False)]


class TuneRange(_Table):
    """``{log = [low, high], num = N}`` or ``{linear = [low, high], num = N}``: ``num`` values
    from low to high (without ``num``, with sampler random or tpe: the continuous range)."""

    log: Annotated[list[Bound], Field(min_length=2, max_length=2)] | None = None
    linear: Annotated[list[Bound], Field(min_length=2, max_length=2)] | None = None
    num: Annotated[int, Field(ge=2)] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> TuneRange:
        if (self.log is None) == (self.linear is None):
            raise ValueError("a range sets exactly one of 'log' and 'linear'")
        low, high = self.log or self.linear
        if not low < high:
            raise ValueError(f"a range is [low, high] with low < high, got {[low, high]}")
        if self.log is not None and low <= 0:
            raise ValueError(f"a log range needs low > 0, got {[low, high]}")
        return self


TuneValues = Annotated[
    Annotated[Annotated[list[Any], Field(min_length=1), AfterValidator(_candidates)],
              Tag(LIST_TAG)] | Annotated[TuneRange, Tag(RANGE_TAG)],
    Discriminator(_range_or_list, custom_error_type="entry_type",
                  custom_error_message="must be a list of candidates or a range table "
                                       "{log = [low, high], num = N}"),
]


class TuneTable(_Table):
    """``[tune]``: what ``chimera tune`` searches, on which seeds, by which validation metric
    (docs/suites.md#tuning-chimera-tune)."""

    params: Annotated[dict[Annotated[str, AfterValidator(_tune_address)], TuneValues],
                      Field(min_length=1)]
    sampler: Literal[TUNE_SAMPLERS] = "grid"
    trials: PositiveInt | None = None
    seeds: Seeds | None = None
    metric: Literal[tuple(TUNE_METRICS)] = "val_accuracy"
    sampler_seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _budget(self) -> TuneTable:
        grid = self.sampler == "grid"
        if grid and self.trials is not None:
            raise ValueError("trials goes with sampler 'random' or 'tpe' (sampler 'grid' tries "
                             "every candidate)")
        if not grid and self.trials is None:
            raise ValueError(f"sampler {self.sampler!r} needs trials = N (candidates tried per "
                             "configuration)")
        for key, values in self.params.items():
            if grid and isinstance(values, TuneRange) and values.num is None:
                raise ValueError(f"params.{key}: sampler 'grid' needs num = N in a range")
            if not grid and isinstance(values, list) and any(isinstance(v, list | dict)
                                                             for v in values):
                raise ValueError(f"params.{key}: sampler {self.sampler!r} takes numbers, "
                                 f"strings or booleans as candidates (lists and tables go with "
                                 f"sampler 'grid'), got {values!r}")
        return self


# --- model hyper-parameters --------------------------------------------------------------------

@functools.cache
def _model_signature(model: str) -> tuple[dict[str, Any], bool]:
    """The keyword arguments of the registered ``model``'s factory, ``{name: (annotation,
    default)}``, and whether it takes ``**kwargs``; unresolvable annotations are ``Any``."""
    factory = MODELS.get(model)
    params = inspect.signature(factory).parameters
    try:
        hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    except Exception:  # annotations that do not resolve at runtime: keys only
        hints = {}
    fields = {n: (hints.get(n, Any), ... if p.default is p.empty else p.default)
              for n, p in params.items()
              if n not in MODEL_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return fields, any(p.kind is p.VAR_KEYWORD for p in params.values())


@functools.cache
def _model_hparams_table(model: str) -> type[BaseModel]:
    fields, var_keyword = _model_signature(model)
    config = ConfigDict(strict=True, extra="allow" if var_keyword else "forbid",
                        arbitrary_types_allowed=True)
    try:
        return create_model(f"model_hparams of {model}", __config__=config, **fields)
    except Exception:  # an annotation pydantic cannot check: its keys only
        return create_model(f"model_hparams of {model}", __config__=config,
                            **{n: (Any, d) for n, (_, d) in fields.items()})


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_model_hparams(model: str, hparams: dict[str, Any]) -> None:
    """``hparams`` fit the registered ``model`` factory's keyword arguments (names, and types
    where annotated); ``ValueError`` names the key and what is allowed."""
    fields, var_keyword = _model_signature(model)
    allowed = {n: _type_name(a) for n, (a, _) in fields.items()}
    if not var_keyword:
        known_keys(f"model '{model}'", hparams, allowed, "argument")
    try:
        _model_hparams_table(model).model_validate(hparams)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        key = ".".join(map(str, error["loc"]))
        described = ", ".join(f"{n}: {a}" for n, a in allowed.items())
        raise ValueError(f"{key} of model '{model}': {error['msg']}, got {error['input']!r} "
                         f"(allowed: {described})") from None


# --- errors and the entry point ----------------------------------------------------------------

def _one_line(error: ValidationError, where: str, data: Mapping[str, Any]) -> str:
    """The first error of ``error`` as one line: file and table, the key (its location joined
    with '.'), the message."""
    first = error.errors(include_url=False)[0]
    loc = [p for p in first["loc"] if p not in (NAME_TAG, TABLE_TAG, LIST_TAG, RANGE_TAG)]
    prefix = where
    if len(loc) > 1 and loc[0] == "grid" and isinstance(loc[1], int):
        name = data["grid"][loc[1]].get("name") if isinstance(data["grid"][loc[1]], dict) \
            else None
        prefix = grid_label(where, loc[1] + 1, name)
        loc = loc[2:]
    elif loc and loc[0] in ("stress", "toy_lq", "tune"):
        prefix, loc = f"{where} [{loc[0]}]", loc[1:]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("model_type", "dict_type"):  # TOML words, not the model's class name
        message = "Input should be a table"
    scalar = not isinstance(first["input"], dict | list | BaseModel)
    if first["type"] not in ("value_error", "missing", "entry_type") and scalar:
        message += f", got {first['input']!r}"
    key = ".".join(map(str, loc))
    return f"{prefix}: {key}: {message}" if key else f"{prefix}: {message}"


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"suite file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise ValueError(f"suite file {path} cannot be read: {e.strerror}") from None


def load_suite(
    source: str | os.PathLike | Mapping[str, Any], where: str | None = None, *,
    edit: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Suite:
    """The suite file at ``source`` (read as TOML), or the parsed suite ``source`` (a dict),
    validated and expanded: the one way into a suite.

    ``where`` names the suite in errors (default: the path, or ``"suite"`` for a dict); ``edit``
    maps the parsed data before validation (``chimera bench``'s overrides). Every problem
    (unknown key, wrong type, unknown name, bad device or value, a configuration that fails its
    probe build) raises one ``ValueError`` line naming the file, the table and the key, before
    anything runs.
    """
    if isinstance(source, Mapping):
        data, where = dict(source), where or "suite"
    else:
        data, where = _read_toml(Path(source)), where or str(source)
    if edit is not None:
        data = edit(data)
    try:
        table = SuiteTable.model_validate(data)
    except ValidationError as e:
        raise ValueError(_one_line(e, where, data)) from None
    return expand(table, where)

