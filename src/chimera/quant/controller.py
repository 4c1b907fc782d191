"""Bang-bang controller that moves the threshold factor alpha toward a target zero ratio
(docs/algorithms.md#target-bits-controller).

A larger alpha zeroes more weights, so ``update`` raises alpha while the measured zero ratio is
below ``target - tolerance``, lowers it while above ``target + tolerance``, and clips it to
``[alpha_min, alpha_max]``. The target zero ratio comes from the target entropy ``target_bits`` on
the chosen branch of ``H(z, (1-z)/2, (1-z)/2)`` unless given directly.
"""

from __future__ import annotations

from typing import Any

from chimera._validate import choice, number
from chimera.quant.stats import BRANCHES, MAX_TERNARY_BITS, symmetric_zero_ratio_for_entropy


class TargetBitsController:
    """``update(alpha, current_zero_ratio) -> alpha'``;
    ``last_error = current_zero_ratio - target_zero_ratio``."""

    _CONFIG = ("target_bits", "branch", "target_zero_ratio", "tolerance", "step_size",
               "alpha_min", "alpha_max")

    def __init__(
        self,
        target_bits: float = 1.32,
        branch: str = "sparse",
        target_zero_ratio: float | None = None,
        tolerance: float = 0.02,
        step_size: float = 0.05,
        alpha_min: float = 0.0,
        alpha_max: float = 1.5,
    ) -> None:
        self.branch = choice("branch", branch, BRANCHES)
        self.target_bits = number("target_bits", target_bits, 0, MAX_TERNARY_BITS)
        if target_zero_ratio is None:
            self.target_zero_ratio = symmetric_zero_ratio_for_entropy(self.target_bits, branch)
        else:
            self.target_zero_ratio = number("target_zero_ratio", target_zero_ratio, 0, 1)
        self.tolerance = number("tolerance", tolerance, 0)
        self.step_size = number("step_size", step_size, 0, low_open=True)
        self.alpha_min = number("alpha_min", alpha_min, 0)
        self.alpha_max = number("alpha_max", alpha_max, self.alpha_min)
        self.last_error: float | None = None

    def update(self, alpha: float, current_zero_ratio: float) -> float:
        """The next alpha: one ``step_size`` toward the target band, clipped."""
        alpha = number("alpha", alpha)
        zero_ratio = number("current_zero_ratio", current_zero_ratio, 0, 1)
        self.last_error = zero_ratio - self.target_zero_ratio
        if self.last_error < -self.tolerance:
            alpha += self.step_size
        elif self.last_error > self.tolerance:
            alpha -= self.step_size
        return min(max(alpha, self.alpha_min), self.alpha_max)

    def state_dict(self) -> dict[str, Any]:
        """Configuration (with the resolved target zero ratio) and ``last_error``."""
        return {**{key: getattr(self, key) for key in self._CONFIG}, "last_error": self.last_error}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; its values are validated like constructor arguments."""
        expected = {*self._CONFIG, "last_error"}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"state has missing keys {missing} and unexpected keys {unexpected}")
        restored = type(self)(**{key: state[key] for key in self._CONFIG})
        error = state["last_error"]
        restored.last_error = None if error is None else number("last_error", error, -1, 1)
        self.__dict__.update(restored.__dict__)


SparseBranchController = TargetBitsController  # the original project's name
