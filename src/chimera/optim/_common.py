"""What the optimizers of the toolkit share: closures, the foreach policy, the sign that keeps
NaN, the upgrade and the check of a state dict before it is loaded, and the base class of the
optimizers with a ``fused`` option."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """Run ``closure`` with grad enabled (``step`` itself runs under no_grad); None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def sign_keep_nan(t: Tensor) -> Tensor:
    """``sign(t)``, except that a non-finite entry gives NaN instead of torch's sign(NaN) = 0,
    so a non-finite gradient reaches the parameter as in every other optimizer here."""
    return torch.sign(t).add_(t, alpha=0)


def use_foreach(foreach: bool | None, params: Sequence[Tensor]) -> bool:
    """Whether a group runs its ``torch._foreach_*`` path: ``foreach`` when given; for None,
    torch's default: every parameter and gradient on one device of a type with native foreach
    kernels (``_get_foreach_kernels_supported_devices()``: CUDA, XPU, ...) and of one dtype."""
    if foreach is not None:
        return foreach
    tensors = [*params, *(p.grad for p in params)]
    return (
        bool(params)
        and len({(t.device, t.dtype) for t in tensors}) == 1
        and params[0].device.type in _get_foreach_kernels_supported_devices()
    )


def upgrade_saved_state(
    state_dict: Any, group_defaults: dict[str, Any], step_dtype: torch.dtype
) -> Any:
    """A copy of ``state_dict`` (tensors shared) as this toolkit saves it: every param group gets
    the keys of ``group_defaults`` it lacks (states of the original projects, or older ones, have
    no ``foreach``, ``fused``, ...), and a Python-int ``step`` >= 0 (the originals count steps
    in ints) becomes a 0-dim tensor of ``step_dtype``; any other non-tensor ``step`` (a float,
    NaN, a negative count) is left for the check that follows to reject, as is anything not
    shaped like an optimizer state dict."""
    if not is_state_dict_form(state_dict):
        return state_dict
    groups, states = state_dict["param_groups"], state_dict["state"]
    groups = [{**group_defaults, **g} for g in groups]
    states = {pid: _tensor_step(s, step_dtype) for pid, s in states.items()}
    return {**state_dict, "param_groups": groups, "state": states}


def _tensor_step(state: Any, dtype: torch.dtype) -> Any:
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        return {**state, "step": torch.tensor(float(step), dtype=dtype)}
    return state


def is_state_dict_form(state_dict: Any) -> bool:
    """Whether ``state_dict`` is shaped like an optimizer state dict: a dict whose ``state`` is
    a dict and whose ``param_groups`` is a list of dicts, each with a ``params`` list."""
    return (
        isinstance(state_dict, dict)
        and isinstance(state_dict.get("state"), dict)
        and isinstance(state_dict.get("param_groups"), list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                for g in state_dict["param_groups"])
    )


def require_state_dict_form(state_dict: Any) -> None:
    """One-line ``ValueError`` unless :func:`is_state_dict_form`."""
    if not is_state_dict_form(state_dict):
        raise ValueError(f"state_dict must be an optimizer state dict (a dict with 'state' and "
                         f"'param_groups'), got {type(state_dict).__name__}")


def check_loaded_state(
    opt: torch.optim.Optimizer,
    state_dict: Any,
    *,
    group_keys: Callable[[dict[str, Any]], Iterable[str]],
    check_group: Callable[[dict[str, Any], dict[str, Any]], None],
    state_keys: Callable[[dict[str, Any]], Iterable[str]],
    scalar_keys: Iterable[str] = ("step",),
    optional_keys: Iterable[str] = ("fused",),
) -> None:
    """One-line ``ValueError`` unless ``state_dict`` is a state of ``opt``'s own kind for its
    parameters, checked before torch loads it (so nothing fails at the next ``step``).

    Per param group i (``group`` is ``opt``'s, ``saved`` the loaded one): as many groups and
    parameters; every key ``group_keys(group)`` present in ``saved`` (but ``optional_keys``);
    ``check_group(saved, group)`` accepts the saved values (its ``ValueError`` is
    prefixed with the group). Per parameter with a saved state: exactly the keys
    ``state_keys(group)``, each a tensor of the parameter's shape (0-dim for ``scalar_keys``).
    """
    owner = type(opt).__name__
    require_state_dict_form(state_dict)
    saved_groups, states = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"loaded state has {len(saved_groups)} param groups, this {owner} has "
                         f"{len(opt.param_groups)}")
    scalars = set(scalar_keys)
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups, strict=True)):
        where = f"loaded param group {i}"
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where} has {len(saved['params'])} parameters, this {owner}'s "
                             f"has {len(group['params'])}")
        missing = sorted(set(group_keys(group)) - set(saved)
                         - {"params", "differentiable", *optional_keys})
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(f"{where} lacks {', '.join(missing[:3])}{more}: not a {owner} "
                             "state")
        try:
            check_group(saved, group)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        keys = sorted(state_keys(group))
        for pid, p in zip(saved["params"], group["params"], strict=True):
            state = states.get(pid)
            if not state:
                continue  # no state yet (e.g. no gradient so far)
            param = f"parameter {pid} (param group {i})"
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            if got != keys:
                raise ValueError(f"loaded state of {param} has keys {got}, a {owner} keeps "
                                 f"{keys or 'none'}")
            for key, value in state.items():
                shape = () if key in scalars else tuple(p.shape)
                if not torch.is_tensor(value) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(f"loaded state {key!r} of {param} must be a tensor of shape "
                                     f"{shape}, got {got}")


class FusableOptimizer(torch.optim.Optimizer):
    """Base of the optimizers with a ``fused`` option (Chimera21, STAC, ScaledOptum).

    ``_PICKLED_ATTRIBUTES`` name the attributes that pickling and ``copy.deepcopy`` keep besides
    torch's ``defaults``, ``state`` and ``param_groups``; states pickled before ``fused`` existed
    get ``fused=None`` in every group.
    """

    _PICKLED_ATTRIBUTES: ClassVar[tuple[str, ...]] = ()

    def __getstate__(self) -> dict[str, Any]:
        extra = {name: self.__dict__[name] for name in self._PICKLED_ATTRIBUTES}
        return {**super().__getstate__(), **extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("fused", None)

    def _groups_with_grads(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Every param group with its parameters that have a gradient; a sparse gradient is a
        ``RuntimeError`` naming where it was found."""
        active = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        for index, (group, params) in enumerate(active):
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (found in "
                    f"{self._group_label(index, group)})"
                )
        return active

    def _group_label(self, index: int, group: dict[str, Any]) -> str:
        """How error messages name a param group."""
        return f"param group {index}"
