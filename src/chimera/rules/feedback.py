"""Feedback rules on any model built from Linear/Conv layers
(docs/algorithms.md#any-model-fa-dfa-sign-symmetry): ``fa``, ``usf``, ``brsf``, ``frsf`` and the
layer-wise DFA behind ``dfa`` (rules/dfa.py).

The rules never change the model: during :meth:`FeedbackRule.train_step` module hooks make every
feedback layer (``nn.Linear``, ``nn.Conv1d/2d`` and their ternary Bit versions) compute its output
from a *detached* input, so no gradient reaches a layer's input through its forward weight ``W``.
The weight gradient stays exact given the output gradient ``δ`` (``δ xᵀ``; through the STE for Bit
layers); everything between layers (activations, norms, pooling, skip additions) passes its own
local gradient. What reaches a layer's input is the rule's:

- FA / sign symmetry: ``B ⋆ᵀ δ``, the layer's transposed op with a feedback weight ``B`` of ``W``'s
  shape, added as ``z − z.detach()`` with ``z = op(x, B)`` (zero in value, ``Bᵀδ`` in gradient).
  ``fa``: ``B`` fixed, Xavier-uniform. ``usf``: ``B = sign(W)·sqrt(2 / (fan_in + fan_out))``.
  ``frsf``: ``B = |M| ⊙ sign(W)``, ``M`` Xavier-uniform drawn once. ``brsf``: the same with ``M``
  redrawn at every step (from torch's global generator).
- DFA: ``B_l e`` with ``e = ∂ℓ/∂y`` at the model's output and ``B_l`` fixed random (input size ×
  m, entries N(0, 1/m)), at the input of every feedback layer whose input carries a gradient.

Diagnostics: :func:`alignment_angle` of ``W`` and ``B`` per layer (FA and sign symmetry).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera.nn.bit_layers import BitConv1d, BitConv2d, BitLinear
from chimera.rules.learning_rule import RULES, LearningRule

LINEAR_TYPES = (nn.Linear, BitLinear)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, BitConv1d, BitConv2d)


def forward_weight(layer: nn.Module) -> Tensor:
    """The weight a feedback layer computes with: ``weight``, or a Bit layer's ``weight_master``."""
    return layer.weight_master if hasattr(layer, "weight_master") else layer.weight


def feedback_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every Linear/Conv layer (float or Bit) of ``model``; a model without
    one, or a convolution padding other than with zeros, is a ``ValueError``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES + CONV_TYPES)}
    if not layers:
        raise ValueError(f"a feedback rule needs Linear/Conv layers; {type(model).__name__} has "
                         f"none")
    for name, layer in layers.items():
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"layer '{name}' has padding_mode {layer.padding_mode!r}; feedback "
                             f"rules need 'zeros'")
    return layers


def layer_op(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``layer``'s linear map (no bias) applied to ``x`` with ``weight`` in place of its own."""
    if isinstance(layer, LINEAR_TYPES):
        return F.linear(x, weight)
    conv = F.conv1d if weight.dim() == 3 else F.conv2d
    return conv(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def alignment_angle(w: Tensor, b: Tensor) -> float:
    """Angle in degrees between ``w`` and ``b`` flattened: ``arccos(<w, b> / (|w| |b|))``."""
    w, b = w.detach().flatten().double(), b.detach().flatten().double()
    cos = (w @ b) / (w.norm() * b.norm()).clamp(min=1e-300)
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))


def xavier_like(w: Tensor) -> Tensor:
    """A fresh Xavier-uniform tensor of ``w``'s shape: ``U(±sqrt(6 / (fan_in + fan_out)))``."""
    return nn.init.xavier_uniform_(torch.empty_like(w, dtype=torch.float32))


class FeedbackRule(LearningRule):
    """Base of the feedback rules: layer hooks during the step, then ``loss.backward()`` (or the
    subclass's :meth:`_backward`) and ``optimizer.step()``. Works on any model; has no credits
    per residual state."""

    residual = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 **kwargs: Any) -> None:
        super().__init__(model, optimizer, **kwargs)
        self.layers = feedback_layers(model)
        self.feedback: dict[str, Tensor] = {}  # per layer: B (fa), M (frsf, brsf) or B_l (dfa)
        self._inputs: dict[str, Tensor] = {}

    def train_step(self, x: Tensor, c: Tensor) -> dict[str, Any]:
        """One update: hooked forward, the rule's backward, ``optimizer.step()``."""
        if self.optimizer is None:
            raise ValueError(f"rule '{self.name}' has no feedback to train; build it with an "
                             f"optimizer")
        self._check_batch(x, c)
        self.optimizer.zero_grad(set_to_none=True)
        self._before_step()
        with self._hooked():
            try:
                y = self.model(x)
            except RuntimeError as err:
                raise ValueError(f"x of shape {tuple(x.shape)} does not fit the model: "
                                 f"{' '.join(str(err).split())}") from None
        if y.dim() != 2 or y.shape[1] != self.out_dim:
            raise ValueError(f"the model outputs shape {tuple(y.shape)} per batch but out_dim is "
                             f"{self.out_dim}")
        loss = self.loss_fn(y, c)
        self._backward(loss, y)
        self._inputs.clear()
        self.optimizer.step()
        self.step_count += 1
        return {"loss": loss.item(), "logits": y.detach()}

    def credits(self, x: Tensor, c: Tensor) -> list[Tensor]:
        raise ValueError(f"rule '{self.name}' on a {type(self.model).__name__} has no credits "
                         f"per residual state; see alignment_angles()")

    def train_feedback(self, x: Tensor, c: Tensor) -> dict[str, Any]:
        raise ValueError(f"rule '{self.name}' learns no feedback")

    def alignment_angles(self) -> dict[str, float]:
        """``{layer: angle(W, B)}`` in degrees (empty when ``B`` is not shaped like ``W``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Step count and the fixed feedback tensors."""
        return {"rule": self.name, "step_count": self.step_count,
                "feedback": {k: v.clone() for k, v in self.feedback.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a state of another rule is a ``ValueError``)."""
        if not isinstance(state, dict) or state.get("rule") != self.name:
            got = state.get("rule") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"rule state of {got!r} cannot be loaded into rule '{self.name}'")
        device = next(self.model.parameters()).device
        self.feedback = {k: v.to(device) for k, v in state["feedback"].items()}
        self.step_count = state["step_count"]

    # -- for subclasses ----------------------------------------------------------------------
    def _before_step(self) -> None:
        """Draw what changes per step (brSF's magnitudes)."""

    def _layer_output(self, name: str, layer: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        return out

    def _backward(self, loss: Tensor, y: Tensor) -> None:
        loss.backward()

    # -- internals ---------------------------------------------------------------------------
    @contextmanager
    def _hooked(self) -> Iterator[None]:
        """Every feedback layer computes from its detached input; the original input is kept
        for the rule's own gradient path."""
        def pre(name: str):
            def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                self._inputs[name] = args[0]
                return (args[0].detach(), *args[1:])
            return hook

        def post(name: str):
            def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
                return self._layer_output(name, module, self._inputs[name], out)
            return hook

        handles = [h for name, layer in self.layers.items()
                   for h in (layer.register_forward_pre_hook(pre(name)),
                             layer.register_forward_hook(post(name)))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class SymmetryFreeRule(FeedbackRule):
    """FA and the sign-symmetry family: the gradient at a layer's input is ``Bᵀδ``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 **kwargs: Any) -> None:
        super().__init__(model, optimizer, **kwargs)
        if self.name in ("fa", "frsf"):
            self.feedback = {n: xavier_like(forward_weight(m)) for n, m in self.layers.items()}

    def feedback_weight(self, name: str) -> Tensor:
        """``B`` of layer ``name`` (module docstring)."""
        w = forward_weight(self.layers[name]).detach()
        if self.name == "fa":
            return self.feedback[name].to(w.dtype)
        if self.name == "usf":
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
            return w.sign() * math.sqrt(2.0 / (fan_in + fan_out))
        return self.feedback[name].abs().to(w.dtype) * w.sign()

    def alignment_angles(self) -> dict[str, float]:
        return {n: alignment_angle(forward_weight(m), self.feedback_weight(n))
                for n, m in self.layers.items()}

    def _before_step(self) -> None:
        if self.name == "brsf":
            self.feedback = {n: xavier_like(forward_weight(m)) for n, m in self.layers.items()}

    def _layer_output(self, name: str, layer: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if not x.requires_grad:
            return out
        z = layer_op(layer, x, self.feedback_weight(name).to(x.dtype))
        return out + (z - z.detach()).to(out.dtype)


@RULES.register("fa")
class FeedbackAlignment(SymmetryFreeRule):
    """Feedback alignment: fixed random ``B`` per layer."""

    name = "fa"


@RULES.register("usf")
class UniformSignSymmetry(SymmetryFreeRule):
    """Uniform sign-concordant feedback: ``B = sign(W)`` times the Xavier scale."""

    name = "usf"


@RULES.register("brsf")
class BatchRandomSignSymmetry(SymmetryFreeRule):
    """Sign-concordant feedback with random magnitudes redrawn every step."""

    name = "brsf"


@RULES.register("frsf")
class FixedRandomSignSymmetry(SymmetryFreeRule):
    """Sign-concordant feedback with random magnitudes drawn once."""

    name = "frsf"


class LayerDFA(FeedbackRule):
    """Direct feedback alignment at every feedback layer's input: ``∂ℓ/∂x_l := B_l e``."""

    name = "dfa"

    def _layer_output(self, name: str, layer: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if x.requires_grad and name not in self.feedback:
            size = math.prod(x.shape[1:])
            self.feedback[name] = torch.randn(size, self.out_dim, device=x.device) \
                / math.sqrt(self.out_dim)
        return out

    def _backward(self, loss: Tensor, y: Tensor) -> None:
        """``ℓ + Σ_l <x_l, (B_l e).detach()>`` backward: the exact gradient for the output layer,
        ``B_l e`` at every other layer's input, passed locally to the layer that produced it."""
        e = torch.autograd.grad(loss, y, retain_graph=True)[0].flatten(1).float()
        surrogate = loss
        for name, x in self._inputs.items():
            if x.requires_grad:
                a = (e @ self.feedback[name].T).view(x.shape).to(x.dtype)
                surrogate = surrogate + (x * a.detach()).sum()
        surrogate.backward()
