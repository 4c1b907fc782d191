"""Trainer callbacks: what the quantizer, the controller, the optimizer and the learning rule add
to a run's records, and the state they keep in its checkpoints.

Hooks, in the order the :class:`~chimera.run.trainer.Trainer` calls them:

- ``on_fit_start()`` once per ``fit()``, after a resumed run's state is restored and before its
  first training step;
- ``on_step()`` after every training step; ``step_fields()`` when a step record is written;
- ``on_epoch_end()`` after an epoch's last step, before evaluation (fields of the epoch record);
- ``on_eval(x, y)`` after each epoch's evaluation, with the validation split (fields of the eval
  record; the test split is never passed to a callback);
- ``final_fields()`` for the final record;
- ``state_dict()`` / ``load_state_dict()`` for checkpoints (``None``: nothing to keep).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from chimera.nn.quantize import AlphaControl
from chimera.quant.stats import model_quant_stats
from chimera.rules import FeedbackRule, LearningRule, credit_diagnostics
from chimera.run.spec import RunSpec

Fields = dict[str, Any]
DIAG_EXAMPLES = 256  # validation examples on which credit diagnostics are measured each epoch


class Callback:
    """No-op base; ``name`` keys the callback's state in checkpoints."""

    name = ""

    def on_fit_start(self) -> None:
        """Before the first training step of ``fit()`` (after a resume)."""

    def on_step(self) -> None:
        """After every training step."""

    def step_fields(self) -> Fields:
        return {}

    def on_epoch_end(self) -> Fields:
        return {}

    def on_eval(self, x: torch.Tensor, y: torch.Tensor) -> Fields:
        return {}

    def final_fields(self) -> Fields:
        return {}

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore what :meth:`state_dict` returned."""


def quant_record(model: nn.Module) -> Fields:
    """``model_quant_stats`` with a ``quant_`` prefix (empty for a model without ternary layers)."""
    stats = model_quant_stats(model)
    if not stats.get("num_ternary_layers"):
        return {}
    return {f"quant_{k}": v for k, v in stats.items()}


class QuantStats(Callback):
    """Ternary statistics of the last training forward: in step records, and per epoch (taken
    before evaluation runs) in the epoch and final records."""

    name = "quant"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.last: Fields = {}

    def step_fields(self) -> Fields:
        return quant_record(self.model)

    def on_epoch_end(self) -> Fields:
        self.last = quant_record(self.model)
        return self.last

    def final_fields(self) -> Fields:
        return self.last

    def state_dict(self) -> Fields:
        return self.last

    def load_state_dict(self, state: Fields) -> None:
        self.last = state


class Controller(Callback):
    """Steps the target-bits controller every batch or every epoch and records its alpha.

    With ``affects = "alpha_override"`` every Bit layer's override is set to the controller's
    current alpha when ``fit()`` starts, so the first forward already runs at the controller's
    (initial) alpha, as in the original project, instead of the warm-up's alpha_min."""

    name = "controller"

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        self.control = AlphaControl(model, config)

    def on_fit_start(self) -> None:
        if self.control.affects == "alpha_override":
            for layer in self.control.layers:
                layer.alpha_override = self.control.alpha

    def on_step(self) -> None:
        if self.control.frequency == "batch":
            self.control.update()

    def step_fields(self) -> Fields:
        return self.control.record()

    def on_epoch_end(self) -> Fields:
        if self.control.frequency == "epoch":
            self.control.update()
        return self.control.record()

    def state_dict(self) -> Fields:
        return self.control.state_dict()

    def load_state_dict(self, state: Fields) -> None:
        self.control.load_state_dict(state)


def plain(value: Any) -> Any:
    """``value`` as JSON-able data: tensors and numpy scalars as numbers (or lists), tuples as
    lists, anything else unknown as its ``str``."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors, numpy arrays and scalars
        return plain(value.tolist())
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# group keys that are no setting: the parameters, and what schedulers add
_GROUP_BOOKKEEPING = ("params", "initial_lr")


def optimizer_config(opt: torch.optim.Optimizer) -> Fields:
    """The optimizer's resolved settings: ``opt.defaults`` (JSON-able, defaults included) plus,
    when param groups set something else (STAC's trunk and cap roles, ScaledOptum's ternary
    group), ``param_groups``: every group's value of each such setting."""
    defaults = plain(opt.defaults)
    own = {k for group in opt.param_groups for k, v in group.items()
           if k not in _GROUP_BOOKKEEPING and (k not in defaults or plain(v) != defaults[k])}
    if not own:
        return defaults
    groups = [{k: plain(v) for k, v in group.items() if k in own} for group in opt.param_groups]
    return {**defaults, "param_groups": groups}


class OptimizerMetrics(Callback):
    """The optimizer's own diagnostics (``last_diagnostics``) in step records; in the final
    record its resolved settings (``optimizer_config``, taken when the run is set up, before any
    schedule moves the learning rate) and its ``run_metrics()`` (if it has them)."""

    name = "optimizer"

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.config = optimizer_config(opt)

    def step_fields(self) -> Fields:
        diag = getattr(self.opt, "last_diagnostics", None) or {}
        return {f"opt_{k}": v for k, v in diag.items()}

    def final_fields(self) -> Fields:
        run_metrics = getattr(self.opt, "run_metrics", None)
        return {"optimizer_config": self.config,
                **(run_metrics() if run_metrics is not None else {})}


class RuleCredit(Callback):
    """A learning rule's credit diagnostics against exact costates (fp32, on the first
    ``DIAG_EXAMPLES`` validation examples, prefixed ``credit_``), its resolved hyper-parameters
    (``rule_config``, preset values included) in the final record, and its state (feedback
    networks, their optimizers, step count) in checkpoints."""

    name = "rule"

    def __init__(self, rule: LearningRule, seed: int) -> None:
        self.rule, self.seed = rule, seed
        self.last: Fields = {}

    def on_eval(self, x: torch.Tensor, y: torch.Tensor) -> Fields:
        # a private generator keeps the training RNG stream untouched
        diag = credit_diagnostics(self.rule, x[:DIAG_EXAMPLES], y[:DIAG_EXAMPLES],
                                  generator=torch.Generator().manual_seed(self.seed))
        self.last = {f"credit_{k}": v for k, v in diag.items()}
        return self.last

    def final_fields(self) -> Fields:
        return {**self.last, "rule_config": plain(self.rule.hparams)}

    def state_dict(self) -> Any:
        return self.rule.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.rule.load_state_dict(state)


class FeedbackAngles(RuleCredit):
    """A feedback rule's (rules/feedback.py) alignment angles between each layer's forward
    weight ``W`` and feedback ``B`` in degrees after every evaluation (``feedback_angle``: their
    mean, ``feedback_angle_per_layer``; none for DFA, whose ``B_l`` is not shaped like ``W``),
    its ``rule_config`` and its state, as :class:`RuleCredit`."""

    def on_eval(self, x: torch.Tensor, y: torch.Tensor) -> Fields:
        angles = self.rule.alignment_angles()
        self.last = {} if not angles else {
            "feedback_angle": sum(angles.values()) / len(angles),
            "feedback_angle_per_layer": angles}
        return self.last


def default_callbacks(
    spec: RunSpec, model: nn.Module, opt: torch.optim.Optimizer, rule: LearningRule | None
) -> list[Callback]:
    """The callbacks every run registers: quantizer statistics, the controller when the run
    uses one (``spec.controller_config``), the optimizer's metrics and the rule's credit (or
    feedback angles)."""
    callbacks: list[Callback] = [QuantStats(model)]
    if spec.controller_config is not None:
        callbacks.append(Controller(model, spec.controller_config))
    callbacks.append(OptimizerMetrics(opt))
    if rule is not None:
        kind = FeedbackAngles if isinstance(rule, FeedbackRule) else RuleCredit
        callbacks.append(kind(rule, spec.seed))
    return callbacks
