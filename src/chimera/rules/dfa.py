"""``dfa``: direct feedback alignment (docs/algorithms.md#dfa and #any-model-fa-dfa-sign-symmetry).

One rule, two places to inject the projected error, picked by the model's shape:

- a residual model (stem, blocks, head): the credit of every state l = 0..L (h_L included) is
  ``a_l = B_l e``, ``e = ∂ℓ/∂y`` (softmax − onehot for cross-entropy, up to the batch-mean 1/B),
  ``B_l`` fixed random (state size × m) with entries N(0, 1/m), drawn from torch's global
  generator at the first step; the bridges' warm-up blends from these credits;
- any other model: the layer-wise DFA of :class:`~chimera.rules.feedback.LayerDFA` (``B_l e``
  at the input of every Linear/Conv layer).

Nothing is learned on the feedback side.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from chimera.rules.feedback import LayerDFA
from chimera.rules.learning_rule import RESIDUAL_PARTS, RULES, LearningRule, Terminal


@RULES.register("dfa")
class DFA(LearningRule):
    """Credits from fixed random projections of the output error; on a model without all of
    stem, blocks and head, building ``DFA(model, ...)`` returns a :class:`LayerDFA`."""

    name = "dfa"
    uses_direct_feedback = True

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> LearningRule:
        if cls is DFA and model is not None and not all(
                isinstance(getattr(model, n, None), nn.Module) for n in RESIDUAL_PARTS):
            return LayerDFA(model, *args, **kwargs)
        return super().__new__(cls)

    def _own_credits(self, hs: list[Tensor], c: Tensor, term: Terminal) -> list[Tensor]:
        return self.direct_feedback(term.grad_y)
