"""Param groups that apply weight decay to weight matrices only (not to biases and
normalisation layers), for any optimizer that takes param groups."""

from __future__ import annotations

from typing import Any

from torch import nn

from chimera._validate import number

# Normalisation layers: batch/instance norms (``_NormBase``), layer, group, RMS and local
# response norms. Their affine parameters set a scale, which weight decay should not shrink.
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def weight_decay_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay_modules: tuple[type[nn.Module], ...] = NORM_MODULES,
) -> list[dict[str, Any]]:
    """``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay":
    0.0}]`` over the trainable parameters of ``model``, for ``build_optimizer`` or any
    ``torch.optim`` optimizer (a group without parameters is left out).

    A parameter is decayed unless it has at most one dimension (biases, norm scales, scalars)
    or belongs to a module of a ``no_decay_modules`` type (default ``NORM_MODULES``). A shared
    parameter counts once, with its first owner; frozen ones (``requires_grad=False``) are left
    out. STAC builds its own groups by layer and ignores these groups' weight decays: give it
    ``trunk_weight_decay`` and ``cap_weight_decay`` instead.

    Example: ``torch.optim.AdamW(weight_decay_groups(model, 0.01), lr=1e-3)``.
    """
    number("weight_decay", weight_decay, 0)
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            excluded = p.ndim <= 1 or isinstance(module, no_decay_modules)
            (rest if excluded else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
