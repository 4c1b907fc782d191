"""What the optimizers of the toolkit share: closures, the foreach policy, the sign that keeps
NaN, and the base class of the optimizers with a ``fused`` option."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
