"""Learning rules (docs/algorithms.md#learning-rules): ``build_rule(name, model, optimizer, ...)``
and credit diagnostics; FA, DFA and sign symmetry on any model (rules/feedback.py)."""

from chimera.rules import backprop, credit_bridge, dfa, feedback, state_bridge  # noqa: F401
from chimera.rules.diagnostics import (
    costate_cosine,
    credit_diagnostics,
    nudging,
    perturbation_rho,
)
from chimera.rules.feedback import FeedbackRule, LayerDFA, alignment_angle
from chimera.rules.learning_rule import (
    PRESETS,
    RULES,
    LearningRule,
    build_rule,
    check_residual_model,
    exact_costates,
    normalize_credit,
)

__all__ = [
    "PRESETS",
    "RULES",
    "FeedbackRule",
    "LayerDFA",
    "LearningRule",
    "alignment_angle",
    "build_rule",
    "check_residual_model",
    "costate_cosine",
    "credit_diagnostics",
    "exact_costates",
    "normalize_credit",
    "nudging",
    "perturbation_rho",
]
