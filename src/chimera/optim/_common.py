"""Small pieces shared by the optimizers of the toolkit."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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
