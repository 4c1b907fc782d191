"""``dfa``: direct feedback alignment (docs/algorithms.md#setting).

``a_l = B_l e`` for every state l = 0..L (h_L included), ``e = ∂ℓ/∂y`` (softmax − onehot for
cross-entropy, up to the batch-mean 1/B), ``B_l`` fixed random (state size × m) with entries
N(0, 1/m), drawn from torch's global generator at the first step. Nothing is learned on the
feedback side.
"""

from __future__ import annotations

from torch import Tensor

from chimera.rules.learning_rule import RULES, LearningRule, Terminal


@RULES.register("dfa")
class DFA(LearningRule):
    """Credits from fixed random projections of the output error."""

    name = "dfa"
    uses_direct_feedback = True

    def _own_credits(self, hs: list[Tensor], c: Tensor, term: Terminal) -> list[Tensor]:
        return self.direct_feedback(term.grad_y)
