"""``backprop``: end-to-end backpropagation, the reference and upper bound
(docs/algorithms.md#setting).

The update is ordinary backprop of the batch-mean loss through the whole residual forward (not
the normalised local updates of the other rules), so its accuracy is the plain BP baseline; its
credits are the exact costates ``λ_l = ∂ℓ/∂h_l``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from chimera.rules.learning_rule import RULES, LearningRule, exact_costates, residual_states


@RULES.register("backprop")
class Backprop(LearningRule):
    """``loss.backward()`` through every block, then ``optimizer.step()``."""

    name = "backprop"

    def train_step(self, x: Tensor, c: Tensor) -> dict[str, Any]:
        if self.optimizer is None:
            raise ValueError("this rule was built without an optimizer; use train_feedback")
        self._check_batch(x, c)
        self.optimizer.zero_grad(set_to_none=True)
        y = self.model.head(residual_states(self.model, x)[-1])
        loss = self.loss_fn(y, c)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return {"loss": loss.item(), "logits": y.detach()}

    def credits(self, x: Tensor, c: Tensor) -> list[Tensor]:
        """The exact costates ``[λ_0, ..., λ_L]``."""
        self._check_batch(x, c)
        return exact_costates(self.model, x, c, self.loss_fn)
