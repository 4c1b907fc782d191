"""Model conversion to ternary layers, in the spirit of torchao's ``quantize_`` (SPEC 2.4).

``TERNARY_CONVERTERS`` maps a mode to ``converter(module, **quant_kwargs) -> nn.Module`` for an
``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``; ``strict_bitnet`` and ``chimera`` build the Bit
layers of :mod:`chimera.nn.bit_layers`. Other modes register themselves from their own modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from chimera.nn.bit_layers import QUANT_MODES, BitConv1d, BitConv2d, BitLayer, BitLinear
from chimera.nn.int_ternary import IntTernaryModule
from chimera.registry import Registry

Converter = Callable[..., nn.Module]
TERNARY_CONVERTERS: Registry[Converter] = Registry("ternary mode")
# exact types: subclasses such as MultiheadAttention's out_proj are used through their .weight
CONVERTIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BIT_LAYERS: dict[type[nn.Module], type[BitLayer]] = {
    nn.Linear: BitLinear, nn.Conv1d: BitConv1d, nn.Conv2d: BitConv2d,
}
POSITIONAL_SKIPS = ("first", "last")


def _bit_converter(quant_mode: str) -> Converter:
    def convert(module: nn.Module, **quant_kwargs: Any) -> nn.Module:
        if "quant_mode" in quant_kwargs:
            raise ValueError(f"quant_mode is set by the ternary mode ({quant_mode!r}); drop it")
        return _BIT_LAYERS[type(module)].from_float(module, quant_mode=quant_mode, **quant_kwargs)

    return convert


for _mode in QUANT_MODES:
    TERNARY_CONVERTERS.register(_mode)(_bit_converter(_mode))
TERNARY_CONVERTERS.register("int_ternary")(IntTernaryModule.from_float)


def _skipped(names: list[str], skip: Iterable[str]) -> set[str]:
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
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


def ternarize(
    model: nn.Module, mode: str, *, skip: Iterable[str] = POSITIONAL_SKIPS, **quant_kwargs: Any
) -> nn.Module:
    """Swap every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` of ``model`` for ``mode``'s layer.

    In place; returns the model (or the converted module when ``model`` itself is one layer).
    ``skip`` holds ``"first"`` / ``"last"`` (the first / last convertible layer in registration
    order) and/or qualified layer names from ``named_modules()``; ``skip=()`` converts all.
    ``mode="fp32"`` returns the model unchanged. A layer shared by several parents is converted
    once and stays shared.
    """
    if mode == "fp32":
        return model
    convert = TERNARY_CONVERTERS.get(mode)
    layers = [(n, m) for n, m in model.named_modules() if type(m) in CONVERTIBLE_TYPES]
    skipped = _skipped([n for n, _ in layers], skip)
    replaced = {id(m): convert(m, **quant_kwargs) for n, m in layers if n not in skipped}
    if id(model) in replaced:
        return replaced[id(model)]
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter hides a second name for the same child
        for child_name, child in list(parent._modules.items()):
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])
    return model
