"""One quantization API, shaped like torchao's: ``quantize_(model, config)`` swaps every
``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` of a model for the layer of ``config``'s scheme
(docs/algorithms.md#model-conversion).

One frozen dataclass config per quantizer, registered by name in ``QUANTIZERS``:

- ``fp32`` -> :class:`FloatConfig` (nothing is converted, so it takes no arguments);
- ``strict_bitnet`` / ``chimera`` -> :class:`TernaryConfig` (Bit layers, int8 activations);
- ``int_ternary`` -> :class:`IntTernaryConfig` (integer-ternary layers, trained by ScaledOptum).

A config validates itself when built (its layer arguments through a probe layer, so the layer's
own checks are the only ones), and round-trips through plain dicts: ``config.to_dict()`` and
``quantizer_config(**d)``. A config that converts no layer of a model is an error of
:func:`quantize_` (a run recorded as ternary would otherwise train in float). Run specs and suites
name a quantizer and its ``quant_hparams``; a run's final record and checkpoints carry the resolved
``config.to_dict()`` (defaults included).
Beside it sits the wiring of the target-bits controller to the Bit layers (:class:`AlphaControl`).
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from chimera._validate import known_keys, require
from chimera.nn.bit_layers import QUANT_MODES, BitConv1d, BitConv2d, BitLayer, BitLinear
from chimera.nn.int_ternary import IntTernaryLinear, IntTernaryModule
from chimera.quant.controller import TargetBitsController
from chimera.quant.stats import model_quant_stats
from chimera.registry import Registry

# exact types: subclasses such as MultiheadAttention's out_proj are used through their .weight
CONVERTIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
POSITIONAL_SKIPS = ("first", "last")
_FP32_TAKES_NOTHING = "quantizer 'fp32' converts no layer and takes no hyper-parameters, got {}"
_BIT_LAYERS: dict[type[nn.Module], type[BitLayer]] = {
    nn.Linear: BitLinear, nn.Conv1d: BitConv1d, nn.Conv2d: BitConv2d,
}


@dataclass(frozen=True)
class QuantConfig:
    """Base of the quantizer configs: ``skip`` names the layers left in float (``"first"`` /
    ``"last"``: the first / last convertible layer in registration order, or qualified names
    from ``named_modules()``); subclasses add their layers' arguments."""

    skip: tuple[str, ...] = POSITIONAL_SKIPS
    name: ClassVar[str] = "fp32"
    requires_optimizer: ClassVar[str | None] = None  # the only optimizer that can train it
    controllable: ClassVar[bool] = False  # its layers are Bit layers the controller can drive

    def __post_init__(self) -> None:
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        if not isinstance(skip, Iterable) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip must be a layer name or a list of them, got {self.skip!r}")
        skip = tuple(skip)
        require(len(set(skip)) == len(skip), "skip", skip, "distinct layer names")
        object.__setattr__(self, "skip", skip)
        with torch.random.fork_rng(devices=[]):  # the probe layer's init draws no global numbers
            self._probe()

    def _probe(self) -> None:
        """Build one tiny layer with the config's arguments (the layer validates them)."""

    def layer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the scheme's layers."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("skip", "quantizer")}

    def convert(self, module: nn.Module) -> nn.Module:
        """The quantized twin of one convertible layer."""
        return module

    def keep_tie(self, name: str, module: nn.Module, layer: nn.Module, attr: str,
                 others: list[str]) -> None:
        """Keep ``module.<attr>``, a Parameter also registered as ``others`` (tied weights),
        shared by the converted ``layer``; this scheme cannot, so it refuses in one line."""
        raise ValueError(
            f"layer '{name}' cannot be converted by quantizer '{self.name}': its {attr} is tied "
            f"to {others} and its quantized layer keeps no float {attr}; leave it in float with "
            f"skip=[{name!r}]")

    def to_dict(self) -> dict[str, Any]:
        """``{"quantizer": name, **fields}``: plain data that :func:`quantizer_config` rebuilds."""
        return {"quantizer": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class FloatConfig(QuantConfig):
    """``fp32``: the model stays as it is; it converts nothing, so it takes no arguments (an
    empty ``skip`` is accepted as the no-op it is)."""

    skip: tuple[str, ...] = ()

    def _probe(self) -> None:
        if self.skip:
            raise ValueError(_FP32_TAKES_NOTHING.format({"skip": list(self.skip)}))


@dataclass(frozen=True)
class TernaryConfig(QuantConfig):
    """Ternary weights with int8 activations in ``BitLinear`` / ``BitConv1d`` / ``BitConv2d``
    (docs/algorithms.md#bit-layers); ``quantizer`` is the weight quantizer (``chimera``: dynamic
    threshold, ``strict_bitnet``: BitNet b1.58 absmean). Defaults are the layers' own."""

    quantizer: str = "chimera"
    stat_mode: str = "mean"
    rho_s: float = 0.95
    alpha_min: float = 0.0
    alpha_target: float = 0.7
    warmup_steps: int = 100
    eps_gamma: float = 1e-6
    eps_beta: float = 1e-6
    ste_clip: float | None = 1.0
    act_quant: str = "per_tensor"
    act_ste: bool = True
    compiled: bool | None = None
    controllable: ClassVar[bool] = True

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.quantizer

    def _probe(self) -> None:
        if self.quantizer not in QUANT_MODES:
            raise ValueError(f"quantizer must be one of {QUANT_MODES} for ternary Bit layers, "
                             f"got {self.quantizer!r}")
        BitLinear(1, 1, **self.layer_kwargs())

    def layer_kwargs(self) -> dict[str, Any]:
        return {**super().layer_kwargs(), "quant_mode": self.quantizer}

    def convert(self, module: nn.Module) -> nn.Module:
        return _BIT_LAYERS[type(module)].from_float(module, **self.layer_kwargs())

    def keep_tie(self, name: str, module: nn.Module, layer: nn.Module, attr: str,
                 others: list[str]) -> None:
        """The Bit layer takes the tied Parameter itself as its latent weight (or bias)."""
        setattr(layer, "weight_master" if attr == "weight" else attr, getattr(module, attr))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self)}


@dataclass(frozen=True)
class IntTernaryConfig(QuantConfig):
    """Integer-ternary layers (docs/algorithms.md#integer-ternary-layers): ternary ``T`` with
    per-group power-of-two scales, no float weights; trained by ScaledOptum alone."""

    group_size: int = 32
    act_quant: str = "per_tensor"
    name: ClassVar[str] = "int_ternary"
    requires_optimizer: ClassVar[str | None] = "scaled_optum"

    def _probe(self) -> None:
        IntTernaryLinear(1, 1, **self.layer_kwargs())

    def convert(self, module: nn.Module) -> nn.Module:
        return IntTernaryModule.from_float(module, **self.layer_kwargs())


QUANTIZERS: Registry[type[QuantConfig]] = Registry("quantizer", "chimera.quantizers")
QUANTIZERS.register("fp32")(FloatConfig)
for _mode in QUANT_MODES:
    QUANTIZERS.register(_mode)(TernaryConfig)
QUANTIZERS.register("int_ternary")(IntTernaryConfig)


def controllable_quantizers() -> list[str]:
    """The quantizers whose layers the target-bits controller can drive (Bit layers)."""
    return [n for n in QUANTIZERS.names() if QUANTIZERS.get(n).controllable]


def quantizer_config(quantizer: str, **hparams: Any) -> QuantConfig:
    """The config of the registered ``quantizer`` with ``hparams``; an unknown name, key or value
    raises ``ValueError`` naming it and what is allowed."""
    cls = QUANTIZERS.get(quantizer)
    if cls is FloatConfig and set(hparams) - {"skip"}:
        raise ValueError(_FP32_TAKES_NOTHING.format(hparams))
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "quantizer"]
    known_keys(f"quantizer '{quantizer}'", hparams, allowed, "hyper-parameter")
    if cls is TernaryConfig:
        hparams = {**hparams, "quantizer": quantizer}
    try:
        return cls(**hparams)
    except TypeError as e:
        raise ValueError(f"quantizer '{quantizer}': {e}") from None


def _skipped(names: list[str], skip: tuple[str, ...]) -> set[str]:
    unknown = [s for s in skip if s not in POSITIONAL_SKIPS and s not in names]
    if unknown:
        raise ValueError(
            f"skip names {unknown} are not convertible layers; valid: {list(POSITIONAL_SKIPS)} "
            f"or one of {names}"
        )
    chosen = {s for s in skip if s not in POSITIONAL_SKIPS}
    if names and "first" in skip:
        chosen.add(names[0])
    if names and "last" in skip:
        chosen.add(names[-1])
    return chosen


def _nothing_converted(config: QuantConfig, names: list[str]) -> str:
    """Why ``config`` converts no layer of a model whose convertible layers are ``names``."""
    if not names:
        return (f"quantizer '{config.name}' would convert no layer: the model has no "
                "nn.Linear, nn.Conv1d or nn.Conv2d (subclasses are left alone)")
    shown = [n or "(the model itself)" for n in names]
    return (f"quantizer '{config.name}' would convert no layer: skip {list(config.skip)} keeps "
            f"all of the model's convertible layers {shown} in float; skip fewer (skip=[] "
            "converts every one)")


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name under which ``model`` registers each Parameter (by id)."""
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                names.setdefault(id(param), []).append(f"{module_name}.{attr}".lstrip("."))
    return names


def _ties(names: dict[int, list[str]], name: str, module: nn.Module) -> dict[str, list[str]]:
    """``{attr: other names}`` for each of ``module``'s weight and bias registered elsewhere too
    (a tied Parameter, e.g. a decoder sharing the embedding's weight)."""
    own = {attr: getattr(module, attr) for attr in ("weight", "bias")}
    others = {attr: [n for n in names[id(p)] if n != f"{name}.{attr}".lstrip(".")]
              for attr, p in own.items() if p is not None}
    return {attr: o for attr, o in others.items() if o}


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` of ``model`` (but ``config.skip``)
    for ``config``'s layer, in place; returns the model (or the converted module when ``model``
    itself is one layer). A layer shared by several parents is converted once and stays shared.
    A weight or bias tied to another module's Parameter stays tied: the Bit layer uses that
    Parameter as its latent weight; a scheme without float weights (``int_ternary``) refuses
    such a layer with a ValueError naming it and suggesting ``skip``.

    A quantizing config that would convert nothing (``skip`` covers every convertible layer, or
    the model has none) raises ``ValueError``: the model would silently stay in float while its
    runs are recorded under the quantizer's name. ``fp32`` returns the model unchanged.
    """
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a quantizer config ({', '.join(QUANTIZERS.names())}), "
                         f"got {type(config).__name__}")
    if isinstance(config, FloatConfig):
        return model
    layers = [(n, m) for n, m in model.named_modules() if type(m) in CONVERTIBLE_TYPES]
    names = [n for n, _ in layers]
    skipped = _skipped(names, config.skip)
    names_of = _parameter_names(model)
    replaced = {}
    for n, m in layers:
        if n not in skipped:
            replaced[id(m)] = config.convert(m)
            for attr, others in _ties(names_of, n, m).items():
                config.keep_tie(n, m, replaced[id(m)], attr, others)
    if not replaced:
        raise ValueError(_nothing_converted(config, names))
    if id(model) in replaced:
        return replaced[id(model)]
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter hides a second name for the same child
        for child_name, child in list(parent._modules.items()):
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])
    return model


def ternarize(
    model: nn.Module, quantizer: str, *, skip: Iterable[str] | None = None, **hparams: Any
) -> nn.Module:
    """``quantize_(model, quantizer_config(quantizer, skip=skip, **hparams))``: the one-line form
    (``skip=None``: the config's default, first and last; ``"fp32"`` returns the model
    unchanged)."""
    if skip is not None:
        hparams["skip"] = (skip,) if isinstance(skip, str) else tuple(skip)
    return quantize_(model, quantizer_config(quantizer, **hparams))


CONTROLLER_FREQUENCIES = ("epoch", "batch")
CONTROLLER_AFFECTS = ("alpha_target", "alpha_override")


def controller_settings(config: dict[str, Any]) -> tuple[str, str, TargetBitsController]:
    """``(frequency, affects, controller)`` of a controller table (see :class:`AlphaControl`),
    validated: an unknown key or a bad value raises one ``ValueError`` line naming it."""
    require(isinstance(config, dict), "controller", config, "a table of controller settings")
    own = [p for p in inspect.signature(TargetBitsController.__init__).parameters if p != "self"]
    known_keys("controller", config, ["frequency", "affects", *own], "setting")
    cfg = dict(config)
    frequency = cfg.pop("frequency", "epoch")
    affects = cfg.pop("affects", "alpha_target")
    if frequency not in CONTROLLER_FREQUENCIES:
        raise ValueError(f"controller frequency must be one of {CONTROLLER_FREQUENCIES}, "
                         f"got {frequency!r}")
    if affects not in CONTROLLER_AFFECTS:
        raise ValueError(f"controller affects must be one of {CONTROLLER_AFFECTS}, "
                         f"got {affects!r}")
    return frequency, affects, TargetBitsController(**cfg)


class AlphaControl:
    """Moves every Bit layer's alpha toward the target zero ratio of a
    :class:`~chimera.quant.controller.TargetBitsController`
    (docs/algorithms.md#target-bits-controller).

    ``config`` keys: ``frequency`` (epoch | batch), ``affects`` (alpha_target | alpha_override:
    the override also skips the warm-up), and the controller's own arguments
    (:func:`controller_settings`).
    """

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        self.model = model
        self.frequency, self.affects, self.controller = controller_settings(config)
        self.layers = [m for m in self.model.modules() if isinstance(m, BitLayer)]
        if not self.layers:
            raise ValueError("a controller needs a model with BitLinear/BitConv layers "
                             f"(quantizer {' or '.join(controllable_quantizers())})")
        self.alpha = statistics.fmean(m.alpha_target for m in self.layers)

    def update(self) -> None:
        """One controller step from the model's global (weighted) zero ratio of the last
        training forward."""
        zero_ratio = model_quant_stats(self.model)["global_zero_ratio"]
        self.alpha = self.controller.update(self.alpha, zero_ratio)
        for layer in self.layers:
            setattr(layer, self.affects, self.alpha)

    def record(self) -> dict[str, Any]:
        """Fields for the records: the controlled alpha and the last error."""
        return {"controller_alpha": self.alpha, "controller_error": self.controller.last_error,
                "controller_target_zero_ratio": self.controller.target_zero_ratio}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "state": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = state["alpha"]
        self.controller.load_state_dict(state["state"])
