"""STAC: sign-momentum trunk, AdamW cap (docs/algorithms.md#stac).

Drop-in for the public API of the ``stac-optimizer`` 0.1.2 package: ``STAC``, ``STACPartition``,
``LayerGroup`` and ``partition_trainable_layers``. The model is split into *layers* (modules that
directly own a trainable parameter, in registration order); the last ``last_n_layers`` layers
form the *cap*, updated by AdamW, the others the *trunk*, updated by the sign of a momentum.
Layers are found from the model or from ``(name, parameter)`` pairs (``model.named_parameters()``),
under names without the wrappers' prefixes (``normalize_names``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from chimera._validate import integer, number, number_tuple, require
from chimera.optim._common import (
    FusableOptimizer,
    evaluate_closure,
    require_state_dict_form,
    upgrade_saved_state,
    use_foreach,
)
from chimera.optim._fused import (
    check_fused,
    flat_views,
    foreach_add_,
    run_compiled,
    use_fused,
    worth_compiling_on_cpu,
)

TRUNK = "trunk"
CAP = "cap"
ROOT_LAYER = "<root>"


@dataclass(frozen=True, eq=False)
class LayerGroup:
    """One layer: a module's own trainable parameters and their qualified names."""

    name: str
    parameter_names: tuple[str, ...]
    parameters: tuple[nn.Parameter, ...]


@dataclass(frozen=True, eq=False)
class STACPartition:
    """The trunk layers then the cap layers, each in registration order."""

    trunk_layers: tuple[LayerGroup, ...]
    cap_layers: tuple[LayerGroup, ...]

    @property
    def trunk_layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.trunk_layers)

    @property
    def cap_layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.cap_layers)

    @property
    def trunk_parameters(self) -> tuple[nn.Parameter, ...]:
        return tuple(p for layer in self.trunk_layers for p in layer.parameters)

    @property
    def cap_parameters(self) -> tuple[nn.Parameter, ...]:
        return tuple(p for layer in self.cap_layers for p in layer.parameters)


_WRAPPER_PREFIX = "module"  # DataParallel / DistributedDataParallel
_COMPILED_MODULE = "_orig_mod"  # torch.compile's OptimizedModule


def normalize_names(names: Sequence[str], *, root: str | None = None) -> list[str]:
    """Qualified parameter or layer names without wrapper components: every ``_orig_mod``
    (``torch.compile``), and a leading ``module`` while every name starts with it (DataParallel
    and DDP wrap the whole model), so a wrapped and a plain model give the same names
    (``["module._orig_mod.fc.weight", "module.w"]`` -> ``["fc.weight", "w"]``). A plain model's
    child called ``module`` keeps its name unless it holds every parameter. ``root`` (for layer
    names) is what a name that becomes empty turns into: the wrapped model's own layer."""
    split = [[part for part in name.split(".") if part != _COMPILED_MODULE] for name in names]
    while split and all(parts and parts[0] == _WRAPPER_PREFIX for parts in split):
        if root is None and any(len(parts) == 1 for parts in split):
            break
        split = [parts[1:] for parts in split]
    return [".".join(parts) or root for parts in split]


def _saved_layer_names(groups: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Each group's ``layer_names``, normalised over all groups together."""
    names = [tuple(g.get("layer_names", ())) for g in groups]
    if not all(isinstance(n, str) for group in names for n in group):
        raise ValueError("loaded layer_names must be strings: not a STAC state")
    flat = iter(normalize_names([n for group in names for n in group], root=ROOT_LAYER))
    return [tuple(next(flat) for _ in group) for group in names]


def _layer_of(name: str) -> str:
    """The layer (owning module) of a normalised parameter name; ``"<root>"`` for the root's."""
    return name.rpartition(".")[0] or ROOT_LAYER


def _stac_source(
    params: nn.Module | Iterable[Any], named_by: nn.Module | None
) -> nn.Module | Iterable[Any]:
    """What STAC partitions: ``params`` alone, or the ``(name, parameter)`` pairs of
    ``named_by`` restricted to the parameters (or param groups) ``params`` lists."""
    if named_by is None:
        return params
    if not isinstance(named_by, nn.Module):
        raise ValueError(f"named_by must be an nn.Module, got {type(named_by).__name__}")
    if isinstance(params, Tensor | nn.Module) or not isinstance(params, Iterable):
        raise ValueError("with named_by, STAC takes parameters or param groups of that model, "
                         f"got {type(params).__name__}")
    tensors = []
    for item in params:
        members = item["params"] if isinstance(item, dict) else [item]
        members = [members] if isinstance(members, Tensor) else members
        tensors += [m[1] if isinstance(m, tuple) else m for m in members]
    wanted = {id(p) for p in tensors}
    pairs = [(name, p) for name, p in named_by.named_parameters() if id(p) in wanted]
    if len({id(p) for _, p in pairs}) != len(wanted):
        raise ValueError("STAC was given a parameter that the named_by model does not own")
    return pairs


def _named_trainable(source: nn.Module | Iterable) -> list[tuple[str, nn.Parameter]]:
    """``(normalised name, parameter)`` of every trainable parameter of a model or of
    ``(name, parameter)`` pairs, first occurrence of each parameter only; what carries no names
    is a one-line ``ValueError``."""
    if isinstance(source, nn.Module):
        pairs = list(source.named_parameters())
    elif isinstance(source, Tensor) or not isinstance(source, Iterable):
        raise ValueError(f"STAC needs the model (an nn.Module) or its named_parameters(), got "
                         f"{type(source).__name__}")
    else:
        pairs = list(source)
        if any(isinstance(item, dict) for item in pairs):
            raise ValueError(
                "STAC builds its own trunk/cap param groups: pass the model, "
                "model.named_parameters(), or param groups with named_by=model"
            )
        if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                   and isinstance(item[1], Tensor) for item in pairs):
            raise ValueError(
                "STAC orders layers by parameter name: pass the model (an nn.Module), "
                "model.named_parameters(), or unnamed parameters with named_by=model"
            )
    seen: set[int] = set()
    named = []
    for name, p in pairs:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((name, p))
    return list(zip(normalize_names([n for n, _ in named]), [p for _, p in named], strict=True))


def partition_trainable_layers(
    model: nn.Module | Iterable[tuple[str, Tensor]], *, last_n_layers: int = 1
) -> STACPartition:
    """Split the trainable layers of ``model`` (or of ``(name, parameter)`` pairs such as
    ``model.named_parameters()``): the last ``last_n_layers`` are the cap.

    A layer is a module directly owning (``recurse=False``) a parameter with ``requires_grad``,
    named after it (``normalize_names``), in order of first appearance (a model's registration
    order); a shared parameter belongs to its first owner; the root's own parameters are
    ``"<root>"``. ``last_n_layers=0`` puts everything in the trunk, more than exist everything
    in the cap.
    """
    integer("last_n_layers", last_n_layers, 0)
    by_layer: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in _named_trainable(model):
        by_layer.setdefault(_layer_of(name), []).append((name, p))
    layers = [
        LayerGroup(layer, *(tuple(column) for column in zip(*owned, strict=True)))
        for layer, owned in by_layer.items()
    ]
    if not layers:
        raise ValueError(
            "STAC needs a model with at least one trainable parameter (requires_grad=True)"
        )
    split = max(len(layers) - last_n_layers, 0)
    return STACPartition(tuple(layers[:split]), tuple(layers[split:]))


def _single_tensor_stac_trunk(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    maximize: bool,
) -> None:
    """Trunk update, one tensor at a time (ground truth; see ``STAC``)."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        direction = -g if maximize else g
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        if momentum != 0:
            direction = momentum_buffers[i].mul_(momentum).add_(direction, alpha=1 - momentum)
        p.add_(direction.sign(), alpha=-lr)


def _multi_tensor_stac_trunk(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    maximize: bool,
) -> None:
    """Trunk update with ``torch._foreach_*`` kernels; same math as the for-loop version."""
    if not params:
        return
    decay = 1 - lr * weight_decay if weight_decay != 0 else None
    _foreach_stac_trunk(params, grads, momentum_buffers, decay, -lr, momentum, maximize)


def _compiled_stac_trunk(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    other_grads: list[Tensor],
    lr: Tensor,
    decay: Tensor,
    zero: Tensor,
    *,
    momentum: float,
    maximize: bool,
) -> Tensor:
    """The step ``fused=True`` compiles: the finiteness check of ``grads`` and ``other_grads``
    (the cap's) and the trunk update, one ``_stac_trunk_tensor`` per parameter (a single pass
    each), applied only if every gradient is finite; returns that verdict (0-dim bool).
    ``lr``, ``decay = 1 - lr * wd`` and ``zero`` (0.0) are 0-dim float64 tensors; ``lr`` and
    ``decay`` are rounded to each parameter's dtype as the eager paths round their floats."""
    finite = _compiled_all_finite([*grads, *other_grads], zero)
    for j, (p, g) in enumerate(zip(params, grads, strict=True)):
        flat = flat_views([p, g, momentum_buffers[j]] if momentum != 0 else [p, g])
        _stac_trunk_tensor(
            flat[0], flat[1], flat[2] if momentum != 0 else None, finite,
            decay.to(p.dtype), lr.neg().to(p.dtype), momentum=momentum, maximize=maximize,
        )
    return finite


# The finiteness check reads a large gradient as this many interleaved streams (one core's
# bandwidth grows with the streams in flight: ~30% faster than one stream on CPU).
_CHECK_STREAMS = 8
_CHECK_SPLIT_NUMEL = 2**16


def _compiled_all_finite(grads: list[Tensor], zero: Tensor) -> Tensor:
    """Whether no gradient holds NaN or +-Inf (``_all_finite``'s verdict) as a 0-dim bool
    tensor: ``sum(g * 0)`` is 0 for finite ``g`` and NaN otherwise. A plain sum reduction is
    the fastest one inductor emits on CPU (a NaN-propagating max is ~2.5x slower); ``zero`` is a
    graph input so that ``g * 0`` is not folded away."""
    nan = [_zero_sum(g, zero.to(g.dtype)).isnan() for g in grads if g.numel() > 0]
    if not nan:
        return torch.ones((), dtype=torch.bool, device=zero.device)
    return torch.stack(nan).any().logical_not()


def _zero_sum(g: Tensor, zero: Tensor) -> Tensor:
    """``sum(g * zero)``; a large contiguous ``g`` is summed as ``_CHECK_STREAMS`` slices
    added elementwise first, so that one loop reads them all at once."""
    if not g.is_contiguous() or g.numel() < _CHECK_SPLIT_NUMEL:
        return (g * zero).sum()
    flat = g.view(-1)
    size = flat.numel() // _CHECK_STREAMS
    acc = flat[:size] * zero
    for i in range(1, _CHECK_STREAMS):
        acc = acc + flat[i * size:(i + 1) * size] * zero
    return acc.sum() + (flat[_CHECK_STREAMS * size:] * zero).sum()



def _stac_trunk_tensor(
    p: Tensor,
    g: Tensor,
    buffer: Tensor | None,
    finite: Tensor,
    decay: Tensor,
    neg_lr: Tensor,
    *,
    momentum: float,
    maximize: bool,
) -> None:
    """One trunk parameter's update, elementwise (the compiled path; the operations of
    ``_single_tensor_stac_trunk`` in its order); ``buffer`` is None without momentum.
    ``finite`` (0-dim bool) False leaves everything as it was; ``decay = 1 - lr * wd`` and
    ``neg_lr = -lr`` are 0-dim tensors."""
    direction = -g if maximize else g
    if buffer is not None:
        b_new = buffer * momentum + direction * (1 - momentum)
        buffer.copy_(torch.where(finite, b_new, buffer))
        direction = b_new
    p_new = p * decay + direction.sign() * neg_lr
    p.copy_(torch.where(finite, p_new, p))


def _foreach_stac_trunk(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    decay: float | Tensor | None,
    neg_lr: float | Tensor,
    momentum: float,
    maximize: bool,
) -> None:
    """The multi-tensor trunk update of the foreach path: ``decay`` is ``1 - lr * wd`` (None: no
    decay), ``neg_lr`` is ``-lr``."""
    directions = torch._foreach_neg(grads) if maximize else grads
    if decay is not None:
        torch._foreach_mul_(params, decay)
    if momentum != 0:
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, directions, alpha=1 - momentum)
        directions = momentum_buffers
    foreach_add_(params, torch._foreach_sign(directions), neg_lr)


def _all_finite(grads: list[Tensor]) -> bool:
    """Whether no gradient holds NaN or +-Inf: one foreach max-norm ``max|g|`` per tensor (NaN
    and Inf propagate; a single multi-tensor kernel on CUDA) and a single host sync."""
    grads = [g for g in grads if g.numel() > 0]  # the max-norm of nothing is undefined
    if not grads:
        return True
    device = grads[0].device
    norms = torch._foreach_norm(grads, math.inf)
    return bool(torch.stack([n.to(device) for n in norms]).isfinite().all())


def _grad_like_param(p: Tensor) -> Tensor:
    """``p.grad``, copied into ``p``'s memory layout when the strides differ: torch's fused
    AdamW kernel (CPU, torch 2.13) walks gradient and parameter memory in the same order, so a
    gradient with other strides (e.g. from ``t().contiguous().t()``) would update the wrong
    elements."""
    g = p.grad
    return g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def _scalar_dtype() -> torch.dtype:
    """dtype of AdamW's ``step`` counter, as torch chooses it."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


_GROUP_NUMBERS = ("lr", "weight_decay", "trunk_momentum", "betas", "eps")


def _check_group_numbers(group: dict[str, Any]) -> None:
    """The numbers of a param group: finite ``lr``, ``weight_decay`` >= 0, ``trunk_momentum``
    and ``betas`` in [0, 1), ``eps`` > 0."""
    number("lr", group["lr"], 0)
    number("weight_decay", group["weight_decay"], 0)
    number("trunk_momentum", group["trunk_momentum"], 0, 1, high_open=True)
    number_tuple("betas", group["betas"], 2, 0, 1, high_open=True)
    number("eps", group["eps"], 0, low_open=True)


_GROUP_FLAGS = ("amsgrad", "maximize", "error_if_nonfinite")


def _check_group_flags(group: dict[str, Any]) -> None:
    """The switches of a param group: ``_GROUP_FLAGS`` bools, ``foreach``/``fused`` as
    ``check_fused`` allows."""
    for flag in _GROUP_FLAGS:
        require(isinstance(group[flag], bool), flag, group[flag], "True or False")
    check_fused(group["fused"], group["foreach"])


class STAC(FusableOptimizer):
    r"""Sign-momentum trunk, AdamW cap.

    Trunk parameter p with gradient g, momentum ``mu = trunk_momentum``::

        u = -g if maximize else g
        p <- p * (1 - lr * wd)                     (decoupled weight decay)
        b <- mu * b + (1 - mu) * u                 (state "trunk_momentum_buffer", b_0 = 0)
        p <- p - lr * sign(b)

    with ``mu = 0``: ``p <- p - lr * sign(u)`` and no state. Cap parameters follow
    ``torch.optim.AdamW`` exactly (``amsgrad``, ``maximize``, bias correction; state ``step``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``); the math is torch's functional ``adamw``.

    Defaults: ``trunk_lr = 0.75 * lr`` when trunk and cap are both non-empty, else ``lr``;
    ``cap_lr = lr``; both weight decays default to ``weight_decay``. Param groups: the trunk
    (``stac_role="trunk"``, ``layer_names``) then the cap (``stac_role="cap"``); a role without
    layers (``last_n_layers=0`` or larger than the layer count) has no group at all.

    A step first checks every gradient: sparse ones raise ``RuntimeError``; a non-finite one
    raises with ``error_if_nonfinite=True``, otherwise the whole step is skipped (no parameter
    or state moves) and ``nonfinite_skipped_steps`` (saved in ``state_dict``) is incremented.
    ``foreach=None`` uses the foreach kernels where torch would (all parameters and gradients of
    a group on one CUDA/XPU device with one dtype; see ``chimera.optim._common.use_foreach``).

    ``fused``: True runs the trunk step compiled by ``torch.compile`` (triton on CUDA, C++ on
    CPU): the gradient check (every group's gradients, read once: ``sum(g * 0)`` is NaN
    exactly when g holds NaN or Inf) and the trunk update above, one pass per parameter that
    reads p, g, b and writes p, b once, applied only when every gradient is finite; the cap
    runs torch's fused AdamW kernel (``step`` then lives on the parameter's device, as in
    ``torch.optim.AdamW(fused=True)``). False never compiles. None (default) compiles when
    ``foreach`` is None too and the group sits on one device: on CUDA where torch.compile and
    triton are usable, on CPU when the parameters with a gradient hold
    ``chimera.optim._fused.CPU_MIN_NUMEL`` (2^20) elements or more together (see
    ``chimera.optim._fused``; first step: a one-time compile, ~1.5 min cold for GPT-2 small,
    seconds with inductor's cross-process cache warm). ``fused=True`` with ``foreach=True``
    is a ``ValueError``. lr and weight decay enter the trunk graph as tensors, so a schedule
    recompiles nothing. Results match the for-loop path up to float rounding. As for
    ``foreach``, ``load_state_dict`` restores the saved groups' ``fused``; a state saved by
    any path continues on any other.

    ``model``: the model, or ``(name, parameter)`` pairs such as ``model.named_parameters()``;
    or unnamed parameters or param groups with ``named_by=the_model`` naming them (what
    factories calling ``cls(params, **kwargs)`` can pass, e.g. pytorch-optimizer's
    ``create_optimizer(model, "stac", named_by=model)``): STAC then trains those of the model's
    parameters, ignoring the groups' own settings (it builds its trunk/cap groups). Unnamed
    parameters without ``named_by`` are a ``ValueError`` (the layer order needs names). Layer
    names drop the prefixes of ``torch.compile`` and DDP/DataParallel (``normalize_names``), so
    a state saved on a wrapped model loads on the plain one and the other way round.
    ``load_state_dict`` also takes the states saved by ``stac-optimizer`` 0.1.2 (groups without
    ``foreach``/``fused``, which take this optimizer's values; a Python-int cap ``step``) and
    continues as it would.
    """

    _PICKLED_ATTRIBUTES = ("partition", "last_n_layers", "nonfinite_skipped_steps")

    def __init__(
        self,
        model: nn.Module | Iterable[Any],
        *,
        named_by: nn.Module | None = None,
        lr: float = 1e-3,
        trunk_lr: float | None = None,
        cap_lr: float | None = None,
        last_n_layers: int = 1,
        trunk_momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        trunk_weight_decay: float | None = None,
        cap_weight_decay: float | None = None,
        amsgrad: bool = False,
        maximize: bool = False,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        number("lr", lr, 0)
        number("trunk_momentum", trunk_momentum, 0, 1, high_open=True)
        number_tuple("betas", betas, 2, 0, 1, high_open=True)
        number("eps", eps, 0, low_open=True)
        number("weight_decay", weight_decay, 0)
        _check_group_flags(dict(amsgrad=amsgrad, maximize=maximize,
                                error_if_nonfinite=error_if_nonfinite, foreach=foreach,
                                fused=fused))
        partition = partition_trainable_layers(_stac_source(model, named_by),
                                               last_n_layers=last_n_layers)

        if trunk_lr is None:
            both = bool(partition.trunk_layers and partition.cap_layers)
            trunk_lr = 0.75 * lr if both else lr
        roles = (
            (TRUNK, partition.trunk_layers, trunk_lr, trunk_weight_decay),
            (CAP, partition.cap_layers, lr if cap_lr is None else cap_lr, cap_weight_decay),
        )
        groups = []
        for role, layers, role_lr, role_wd in roles:
            role_wd = weight_decay if role_wd is None else role_wd
            number(f"{role}_lr", role_lr, 0)
            number(f"{role}_weight_decay", role_wd, 0)
            if layers:
                groups.append(
                    {
                        "params": [p for layer in layers for p in layer.parameters],
                        "stac_role": role,
                        "layer_names": tuple(layer.name for layer in layers),
                        "lr": role_lr,
                        "weight_decay": role_wd,
                    }
                )
        defaults = dict(
            lr=lr,
            trunk_momentum=trunk_momentum,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            error_if_nonfinite=error_if_nonfinite,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(groups, defaults)
        self.partition = partition  # from here on add_param_group refuses
        self.last_n_layers = last_n_layers
        self.nonfinite_skipped_steps = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "partition"):
            raise RuntimeError(
                "STAC does not support add_param_group: its trunk/cap partition is fixed by the "
                "model at construction; build a new STAC instead"
            )
        super().add_param_group(param_group)

    def _group_label(self, index: int, group: dict[str, Any]) -> str:
        return f"the {group['stac_role']}"

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``nonfinite_skipped_steps``."""
        return {**super().state_dict(), "nonfinite_skipped_steps": self.nonfinite_skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by a STAC (this one's or ``stac-optimizer``'s) with the same
        partition; anything else is a ValueError."""
        filled = {key: self.defaults[key] for key in ("foreach", "fused")}
        state_dict = upgrade_saved_state(state_dict, filled, _scalar_dtype())
        self._check_same_partition(state_dict)
        super().load_state_dict(state_dict)
        names = _saved_layer_names(self.param_groups)  # they may carry wrapper prefixes
        for group, layer_names in zip(self.param_groups, names, strict=True):
            group["layer_names"] = layer_names
        self.nonfinite_skipped_steps = int(state_dict.get("nonfinite_skipped_steps", 0))

    def _check_same_partition(self, state_dict: dict[str, Any]) -> None:
        require_state_dict_form(state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state has {len(saved_groups)} parameter groups but this STAC has "
                f"{len(self.param_groups)} (roles {[g['stac_role'] for g in self.param_groups]}): "
                "it comes from a different partition"
            )
        saved_names = _saved_layer_names(saved_groups)
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            role = group["stac_role"]
            if saved.get("stac_role") != role:
                raise ValueError(
                    f"loaded parameter group {i} has stac_role {saved.get('stac_role')!r}, "
                    f"expected {role!r}: not a state of this STAC partition"
                )
            missing = [key for key in (*_GROUP_NUMBERS, *_GROUP_FLAGS) if key not in saved]
            if missing:
                raise ValueError(f"loaded {role} group lacks {', '.join(missing)}: not a STAC "
                                 "state")
            try:
                _check_group_numbers(saved)
                _check_group_flags(saved)
            except ValueError as err:
                raise ValueError(f"loaded {role} group: {err}") from None
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded {role} group has {len(saved['params'])} parameters, "
                    f"expected {len(group['params'])}"
                )
            if saved_names[i] != tuple(group["layer_names"]):
                raise ValueError(
                    f"loaded {role} layer names {list(saved.get('layer_names', ()))} differ from "
                    f"this partition's {list(group['layer_names'])}"
                )
        saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key != "step" and torch.is_tensor(value) and value.shape != p.shape:
                    raise ValueError(
                        f"loaded state {key!r} has shape {tuple(value.shape)}, "
                        f"its parameter {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One all-or-nothing STAC step; returns the closure's loss when a closure is given."""
        loss = evaluate_closure(closure)
        active = [(group, params) for group, params in self._groups_with_grads() if params]
        cpu = worth_compiling_on_cpu(p for _, params in active for p in params)
        paths = [self._path(group, params, cpu) for group, params in active]
        fused_trunk = next((i for i, ((group, _), path) in enumerate(zip(active, paths,
                                                                         strict=True))
                            if group["stac_role"] == TRUNK and path == "fused"), None)
        if fused_trunk is None:
            finite = _all_finite([p.grad for _, params in active for p in params])
        else:  # checked inside the compiled trunk step (which moves nothing if not finite),
            # but for gradients on another device
            device = active[fused_trunk][1][0].device
            others = [p for i, (_, params) in enumerate(active) if i != fused_trunk
                      for p in params]
            finite = _all_finite([p.grad for p in others if p.device != device])
            if finite:
                finite = self._fused_trunk_update(
                    *active[fused_trunk], [p for p in others if p.device == device]
                )
        if not finite:
            if any(group["error_if_nonfinite"] for group in self.param_groups):
                raise RuntimeError(
                    "STAC found non-finite gradients (NaN or Inf) with error_if_nonfinite=True; "
                    "no parameter was updated"
                )
            self.nonfinite_skipped_steps += 1
            return loss
        for i, ((group, params), path) in enumerate(zip(active, paths, strict=True)):
            if i == fused_trunk:
                continue
            update = self._trunk_update if group["stac_role"] == TRUNK else self._cap_update
            update(group, params, path)
        return loss

    @staticmethod
    def _path(group: dict[str, Any], params: list[Tensor], cpu: bool) -> str:
        """``"fused"``, ``"foreach"`` or ``"loop"``: how ``group`` runs this step (``cpu``:
        whether ``fused=None`` compiles on CPU, see ``chimera.optim._fused``)."""
        if use_fused(group["fused"], params, group["foreach"], cpu=cpu):
            return "fused"
        return "foreach" if use_foreach(group["foreach"], params) else "loop"

    def _momentum_buffers(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """The trunk momentum buffers of ``params``, created (zeros) where missing; none
        without momentum."""
        if group["trunk_momentum"] == 0:
            return []
        buffers = []
        for p in params:
            state = self.state[p]
            if "trunk_momentum_buffer" not in state:
                state["trunk_momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
            buffers.append(state["trunk_momentum_buffer"])
        return buffers

    def _fused_trunk_update(
        self, group: dict[str, Any], params: list[Tensor], others: list[Tensor]
    ) -> bool:
        """The compiled trunk step: whether every gradient (those of the ``others`` parameters
        too) is finite; only then did the trunk move."""
        buffers = self._momentum_buffers(group, params)
        lr, wd = group["lr"], group["weight_decay"]
        finite = run_compiled(
            _compiled_stac_trunk,
            params,
            [p.grad for p in params],
            buffers,
            [p.grad for p in others],
            key=[*params, *others],
            device=params[0].device,
            scalars=(lr, 1 - lr * wd, 0.0),
            momentum=group["trunk_momentum"],
            maximize=group["maximize"],
        )
        return bool(finite)

    def _trunk_update(self, group: dict[str, Any], params: list[Tensor], path: str) -> None:
        buffers = self._momentum_buffers(group, params)
        grads = [p.grad for p in params]
        update = _multi_tensor_stac_trunk if path == "foreach" else _single_tensor_stac_trunk
        update(params, grads, buffers, lr=group["lr"], weight_decay=group["weight_decay"],
               momentum=group["trunk_momentum"], maximize=group["maximize"])

    def _cap_update(self, group: dict[str, Any], params: list[Tensor], path: str) -> None:
        amsgrad, fused = group["amsgrad"], path == "fused"
        states = []
        for p in params:
            state = self.state[p]
            if not state:  # lazy initialisation, as torch.optim.AdamW does it
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if fused and (state["step"].device, state["step"].dtype) != (p.device, torch.float32):
                state["step"] = state["step"].to(p.device, torch.float32)  # as torch's fused
            states.append(state)
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [_grad_like_param(p) if fused else p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
            [s["step"] for s in states],
            foreach=path == "foreach",
            fused=fused,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=amsgrad,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
