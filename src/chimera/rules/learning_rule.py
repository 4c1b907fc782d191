"""The learning-rule interface (docs/algorithms.md#setting): residual models, local block updates,
the registry.

A *residual model* has modules ``stem``, ``blocks`` (an iterable of branches) and ``head``:
``h_0 = stem(x)``, ``h_{l+1} = h_l + blocks[l](h_l)``, ``y = head(h_L)``. A rule supplies a credit
``a_l ≈ λ_l = ∂ℓ/∂h_l`` for l = 0..L and updates the network locally (:meth:`LearningRule.
train_step`): with ``a_norm = a / (RMS(a) + 1e-6)`` per example, block l minimises
``mean_batch <a_norm_{l+1}, f_l(h_l.detach())>``, the stem minimises ``mean_batch <a_norm_0,
stem(x)>`` and the head gets the exact gradient of ``ℓ(head(h_L.detach()), c)``. No gradient
crosses a block boundary: every block reads a detached state.

Forward passes that only produce targets or diagnostics (noisy rollouts, :meth:`credits`,
:func:`exact_costates`) run the model in eval mode (:func:`frozen`), so they never advance
training state such as a ternary layer's scale EMA or warm-up counter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from chimera._validate import choice, integer, known_keys, number, require
from chimera.registry import Registry

LossFn = Callable[[Tensor, Tensor], Tensor]
RMS_EPS = 1e-6
RESIDUAL_PARTS = ("stem", "blocks", "head")

# docs/algorithms.md#setting hyper-parameters of the bridge rules (toy LQ / classification). The
# toy LQ trains no forward net, so it has no DFA warm-up. Classification weighs terminal gradient
# matching by 100: per-example ∂ℓ/∂h_L is far below the error's norm floor of 1 (docs/rules.md).
PRESETS: dict[str, dict[str, Any]] = {
    "toy": dict(sigma_bridge=0.1, lam=0.1, K=8, term_grad_weight=1.0, ema_momentum=0.995,
                lr_fb=1e-3, warmup_frac=0.0, bridge_hidden=256, emb_dim=16,
                slope_weight=1.0, fm_weight=0.0, fb_steps=1, grad_floor=1.0),
    "classification": dict(sigma_bridge=0.05, lam=0.1, K=4, term_grad_weight=100.0,
                           ema_momentum=0.995, lr_fb=1e-3, warmup_frac=0.2, bridge_hidden=512,
                           emb_dim=16, slope_weight=0.0, fm_weight=0.0, fb_steps=1,
                           grad_floor=1.0),
}

# name -> (type, low, high, low is open); every hyper-parameter a rule may take
_HPARAM_RANGES: dict[str, tuple[type, float, float, bool]] = {
    "sigma_bridge": (float, 0, math.inf, False),
    "lam": (float, 0, math.inf, True),
    "K": (int, 1, math.inf, False),
    "term_grad_weight": (float, 0, math.inf, False),
    "slope_weight": (float, 0, math.inf, False),
    "fm_weight": (float, 0, math.inf, False),
    "fb_steps": (int, 1, math.inf, False),
    "grad_floor": (float, 0, math.inf, True),
    "ema_momentum": (float, 0, 1, False),
    "lr_fb": (float, 0, math.inf, False),
    "warmup_frac": (float, 0, 1, False),
    "bridge_hidden": (int, 1, math.inf, False),
    "emb_dim": (int, 2, math.inf, False),
}


def _check_hparam(name: str, value: Any) -> Any:
    kind, low, high, low_open = _HPARAM_RANGES[name]
    if kind is int:
        value = integer(name, value, low, high)
    else:
        value = number(name, value, low, high, low_open=low_open)
    require(name != "emb_dim" or value % 2 == 0, name, value, "even (sin and cos pairs)")
    return value


# -- residual models -------------------------------------------------------------------------
def check_residual_model(model: nn.Module) -> None:
    """``ValueError`` naming what is missing unless ``model`` has stem, blocks and head modules."""
    missing = [n for n in RESIDUAL_PARTS if not isinstance(getattr(model, n, None), nn.Module)]
    if missing:
        raise ValueError(
            f"a learning rule needs a residual model with modules stem, blocks, head "
            f"(h_{{l+1}} = h_l + blocks[l](h_l)); {type(model).__name__} has no "
            f"{', '.join(missing)}"
        )


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode inside the block; every module's mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def stem_forward(model: nn.Module, x: Tensor) -> Tensor:
    """``h_0 = stem(x)``; an input the stem cannot take is a ``ValueError``."""
    try:
        return model.stem(x)
    except RuntimeError as err:
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit the model's stem: {err}") \
            from None


def residual_states(model: nn.Module, x: Tensor) -> list[Tensor]:
    """``[h_0, ..., h_L]`` of the residual forward (graph as the caller's grad mode says)."""
    hs = [stem_forward(model, x)]
    for block in model.blocks:
        hs.append(hs[-1] + block(hs[-1]))
    return hs


def propagate(model: nn.Module, h: Tensor, start: int) -> Tensor:
    """``head`` of the state reached from ``h = h_start`` through blocks start..L-1."""
    for block in list(model.blocks)[start:]:
        h = h + block(h)
    return model.head(h)


def per_example_loss(loss_fn: LossFn, y: Tensor, c: Tensor) -> Tensor:
    """``(ℓ(y_i, c_i))_i`` of a batch-mean ``loss_fn``, by vmapping it over single examples."""
    return torch.func.vmap(lambda yi, ci: loss_fn(yi.unsqueeze(0), ci.unsqueeze(0)))(y, c)


def normalize_credit(a: Tensor) -> Tensor:
    """``a / (RMS(a) + 1e-6)`` with the RMS taken per example (over all non-batch dims)."""
    rms = a.flatten(1).pow(2).mean(1).sqrt()
    return a / (rms.view(-1, *[1] * (a.dim() - 1)) + RMS_EPS)


def normalised_sq_error(pred: Tensor, target: Tensor, floor: float = 1.0) -> Tensor:
    """``mean_i ||pred_i − target_i||² / max(||target_i||, floor)²`` (rows flattened; scalars
    ok)."""
    pred, target = pred.reshape(len(pred), -1), target.reshape(len(target), -1)
    err = (pred - target).pow(2).sum(1)
    return (err / target.norm(dim=1).clamp(min=floor).pow(2)).mean()


def exact_costates(model: nn.Module, x: Tensor, c: Tensor, loss_fn: LossFn) -> list[Tensor]:
    """``[λ_0, ..., λ_L]``, ``λ_l = ∂ℓ/∂h_l`` of the batch-mean loss, by one backprop pass.

    Runs in eval mode (:func:`frozen`) and leaves every parameter's ``.grad`` untouched.
    """
    check_residual_model(model)
    with frozen(model), torch.enable_grad():
        hs = [stem_forward(model, x).detach().requires_grad_(True)]
        for block in model.blocks:
            hs.append(hs[-1] + block(hs[-1]))
        loss = loss_fn(model.head(hs[-1]), c)
        return [g.detach() for g in torch.autograd.grad(loss, hs)]


# -- feedback networks -----------------------------------------------------------------------
def layer_embedding(layers: Tensor, dim: int, num_states: int) -> Tensor:
    """Sinusoidal embedding of integer layer indices: ``[sin(ω_k l), cos(ω_k l)]``, k < dim/2,
    with periods ``2π/ω_k`` geometric from 2 to ``4 * num_states`` (every layer distinct)."""
    half = dim // 2
    k = torch.arange(half, device=layers.device) / max(half - 1, 1)
    periods = 2.0 * (2.0 * num_states) ** k
    angles = layers.to(torch.float32)[:, None] * (2 * math.pi / periods)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class BridgeNet(nn.Module):
    """``out(h, l, c) = W3 GELU(W2 GELU(W1 z))``, ``z = [h, emb(l), c]`` (h flattened per
    example, c omitted when ``ctx_dim == 0``).

    ``residual_state=True`` adds ``h`` itself (``out_dim`` must equal the state size) and zero-
    initialises ``W3``, so the net starts as the identity map.
    """

    def __init__(self, state_dim: int, ctx_dim: int, out_dim: int, hidden: int, emb_dim: int,
                 num_states: int, *, residual_state: bool = False) -> None:
        super().__init__()
        in_dim = state_dim + emb_dim + ctx_dim
        self.emb_dim, self.num_states, self.residual_state = emb_dim, num_states, residual_state
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, out_dim))
        if residual_state:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h: Tensor, layers: Tensor, ctx: Tensor | None = None) -> Tensor:
        h = h.flatten(1)
        parts = [h, layer_embedding(layers, self.emb_dim, self.num_states)]
        z = torch.cat(parts if ctx is None else [*parts, ctx], dim=1)
        out = self.mlp(z)
        return out + h if self.residual_state else out


class DirectFeedback(nn.Module):
    """Fixed random ``B_l`` (state size × m, entries N(0, 1/m)); ``a_l = B_l e`` for l = 0..L."""

    def __init__(self, num_states: int, state_shape: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.state_shape = tuple(state_shape)
        b = torch.randn(num_states, math.prod(state_shape), out_dim) / math.sqrt(out_dim)
        self.register_buffer("B", b)

    def forward(self, e: Tensor) -> list[Tensor]:
        a = torch.einsum("lsm,bm->lbs", self.B, e.flatten(1))
        return list(a.reshape(len(self.B), -1, *self.state_shape).unbind(0))


# -- the rule interface ----------------------------------------------------------------------
@dataclass(frozen=True)
class Terminal:
    """Output-local information: batch-mean loss, ``y``, ``e = ∂ℓ/∂y``, ``g_L = ∂ℓ/∂h_L``."""

    loss: float
    y: Tensor
    grad_y: Tensor
    grad_h: Tensor


class LearningRule:
    """Base of every rule: credits -> local updates (docs/algorithms.md#setting). Subclasses define
    :meth:`_own_credits` and, when they own feedback networks, :meth:`_build_feedback` and
    :meth:`_train_feedback`. ``optimizer`` (any registered one, over the model) may be ``None``
    for feedback-only training (:meth:`train_feedback`). Hyper-parameters not given come from
    ``PRESETS[preset]``."""

    name: ClassVar[str] = ""
    hparam_names: ClassVar[tuple[str, ...]] = ()
    uses_direct_feedback: ClassVar[bool] = False
    # values that replace the preset's for this rule (e.g. the state bridge has no warm-up)
    preset_overrides: ClassVar[dict[str, Any]] = {}
    residual: ClassVar[bool] = True  # False: the rule works on any model (rules/feedback.py)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 loss_fn: LossFn, out_dim: int, total_steps: int,
                 preset: str = "classification", **hparams: Any) -> None:
        if self.residual:
            check_residual_model(model)
        integer("out_dim", out_dim, 1)
        integer("total_steps", total_steps, 1)
        if not callable(loss_fn):
            raise ValueError("loss_fn must be a callable loss_fn(y, c) -> batch-mean loss")
        known_keys(f"rule '{self.name}'", hparams, self.hparam_names, "hyper-parameter")
        choice("preset", preset, PRESETS)
        values = {**{k: PRESETS[preset][k] for k in self.hparam_names},
                  **self.preset_overrides, **hparams}
        self.hparams = {k: _check_hparam(k, v) for k, v in values.items()}
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.out_dim, self.total_steps = out_dim, total_steps
        self.num_blocks = len(list(model.blocks)) if self.residual else 0
        self.step_count = 0
        self.bridge_residual: float | None = None  # the feedback nets' last training loss
        self.direct_feedback: DirectFeedback | None = None
        self._built = False

    # -- public API ----------------------------------------------------------------------------
    def train_step(self, x: Tensor, c: Tensor) -> dict[str, Any]:
        """One update: zero grads, credits, feedback-net step, local backward passes,
        ``optimizer.step()``. Returns ``{"loss", "logits"}`` (+ ``"bridge_residual"``)."""
        if self.optimizer is None:
            raise ValueError("this rule was built without an optimizer; use train_feedback")
        self._check_batch(x, c)
        self.optimizer.zero_grad(set_to_none=True)
        h0 = stem_forward(self.model, x)
        hs, outs = [h0.detach()], []
        for block in self.model.blocks:
            outs.append(block(hs[-1]))
            hs.append(hs[-1] + outs[-1].detach())
        term = self._terminal(hs[-1], c, train_head=True)
        self._ensure_built(hs)
        credits = self._credits(hs, c, term)
        info = self._train_feedback(hs, c, term)
        self.bridge_residual = info.get("bridge_residual", self.bridge_residual)
        local = [(normalize_credit(a).detach() * out).flatten(1).sum(1).mean()
                 for a, out in zip(credits, [h0, *outs], strict=True) if out.requires_grad]
        if local:
            torch.stack(local).sum().backward()
        self.optimizer.step()
        self.step_count += 1
        return {"loss": term.loss, "logits": term.y, **info}

    def train_feedback(self, x: Tensor, c: Tensor) -> dict[str, Any]:
        """Train only the feedback networks on (x, c); the forward net is left untouched."""
        with frozen(self.model):
            hs, term = self._frozen_states(x, c)
            info = self._train_feedback(hs, c, term)
        self.bridge_residual = info.get("bridge_residual", self.bridge_residual)
        return {"loss": term.loss, "logits": term.y, **info}

    def credits(self, x: Tensor, c: Tensor) -> list[Tensor]:
        """The credits ``[a_0, ..., a_L]`` the next update would use (eval mode, no side
        effects)."""
        with frozen(self.model):
            hs, term = self._frozen_states(x, c)
            return [a.detach() for a in self._credits(hs, c, term)]

    def _frozen_states(self, x: Tensor, c: Tensor) -> tuple[list[Tensor], Terminal]:
        """States and terminal information without training anything (call under frozen)."""
        self._check_batch(x, c)
        with torch.no_grad():
            hs = residual_states(self.model, x)
        term = self._terminal(hs[-1], c, train_head=False)
        self._ensure_built(hs)
        return hs, term

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: step count, last bridge residual and, once built,
        the state shape and every feedback module's and optimizer's state dict."""
        state: dict[str, Any] = {"rule": self.name, "step_count": self.step_count,
                                 "bridge_residual": self.bridge_residual, "built": self._built}
        if self._built:
            state["states"] = (self._num_states, self._state_shape)
            state["feedback"] = {k: v.state_dict() for k, v in self._feedback_parts().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a state of another rule or of feedback networks
        of other shapes is a ``ValueError``."""
        if not isinstance(state, dict) or state.get("rule") != self.name:
            got = state.get("rule") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"rule state of {got!r} cannot be loaded into rule '{self.name}'")
        if state["built"]:
            num_states, shape = state["states"]
            device = next(self.model.parameters()).device
            self.step_count, self._built = 0, False  # build as at the first step, then load
            self._ensure_built([torch.zeros(1, *shape, device=device)] * num_states)
            parts = self._feedback_parts()
            if set(parts) != set(state["feedback"]):
                raise ValueError(f"rule state holds feedback parts {sorted(state['feedback'])}, "
                                 f"rule '{self.name}' has {sorted(parts)}")
            for key, part in parts.items():
                try:
                    part.load_state_dict(state["feedback"][key])
                except (RuntimeError, ValueError, KeyError) as err:
                    raise ValueError(f"rule state '{key}' does not fit: {err}") from None
        self.step_count, self.bridge_residual = state["step_count"], state["bridge_residual"]

    @property
    def warmup_weight(self) -> float:
        """Weight t of the rule's own credit in the DFA warm-up blend: ``min(step / (warmup_frac
        * total_steps), 1)``; 1 without warm-up."""
        frac = self.hparams.get("warmup_frac", 0.0)
        return 1.0 if frac == 0 else min(self.step_count / (frac * self.total_steps), 1.0)

    # -- for subclasses ----------------------------------------------------------------------
    def _own_credits(self, hs: list[Tensor], c: Tensor, term: Terminal) -> list[Tensor]:
        raise NotImplementedError

    def _build_feedback(self, hs: list[Tensor]) -> None:
        """Create feedback networks once the state shape is known (first call)."""

    def _train_feedback(self, hs: list[Tensor], c: Tensor, term: Terminal) -> dict[str, Any]:
        return {}

    def _feedback_parts(self) -> dict[str, Any]:
        """Modules and optimizers whose state :meth:`state_dict` saves (after the build)."""
        return {} if self.direct_feedback is None else {"direct_feedback": self.direct_feedback}

    def _context(self, c: Tensor) -> Tensor:
        """Context as a float (B, out_dim) tensor: one-hot labels or the target itself."""
        if c.dtype.is_floating_point:
            return c.reshape(len(c), self.out_dim).to(torch.float32)
        return nn.functional.one_hot(c, self.out_dim).to(torch.float32)

    # -- internals ---------------------------------------------------------------------------
    def _ensure_built(self, hs: list[Tensor]) -> None:
        if self._built:
            return
        if self.uses_direct_feedback or self.warmup_weight < 1:
            self.direct_feedback = DirectFeedback(len(hs), hs[0].shape[1:], self.out_dim)
            self.direct_feedback.to(hs[0].device)
        self._build_feedback(hs)
        self._num_states, self._state_shape = len(hs), tuple(hs[0].shape[1:])
        self._built = True

    def _credits(self, hs: list[Tensor], c: Tensor, term: Terminal) -> list[Tensor]:
        """Own credits, blended linearly from DFA's during the warm-up (both normalised)."""
        t = self.warmup_weight
        own = self._own_credits(hs, c, term) if t > 0 else None
        if t == 1:
            return own
        dfa = self.direct_feedback(term.grad_y)
        if own is None:
            return dfa
        return [(1 - t) * normalize_credit(d) + t * normalize_credit(a)
                for d, a in zip(dfa, own, strict=True)]

    def _terminal(self, h_last: Tensor, c: Tensor, *, train_head: bool) -> Terminal:
        """Head forward on detached ``h_L``; with ``train_head`` the head's parameter gradients
        are accumulated into ``.grad``."""
        h = h_last.detach().requires_grad_(True)
        params = [p for p in self.model.head.parameters() if p.requires_grad] if train_head else []
        with torch.enable_grad():
            y = self.model.head(h)
            if y.dim() != 2 or y.shape[1] != self.out_dim:
                raise ValueError(f"the model's head outputs shape {tuple(y.shape)} per batch but "
                                 f"out_dim is {self.out_dim}")
            loss = self.loss_fn(y, c)
            grads = torch.autograd.grad(loss, [y, h, *params])
        for p, g in zip(params, grads[2:], strict=True):
            p.grad = g if p.grad is None else p.grad + g
        return Terminal(loss.item(), y.detach(), grads[0], grads[1])

    def _check_batch(self, x: Tensor, c: Tensor) -> None:
        if not isinstance(x, Tensor) or not isinstance(c, Tensor) or x.dim() == 0 or c.dim() == 0:
            raise ValueError("x and c must be batched tensors")
        if len(x) != len(c):
            raise ValueError(f"x and c must have the same batch size, got {len(x)} and {len(c)}")
        if c.dtype.is_floating_point:
            if c.shape[1:] != (self.out_dim,):
                raise ValueError(f"a float context c must have shape (batch, out_dim="
                                 f"{self.out_dim}), got {tuple(c.shape)}")
        elif c.dim() != 1 or c.min() < 0 or c.max() >= self.out_dim:
            raise ValueError(f"integer labels c must have shape (batch,) and values in "
                             f"[0, out_dim={self.out_dim}), got shape {tuple(c.shape)}")


RULES: Registry[type[LearningRule]] = Registry("learning rule", "chimera.rules")


def build_rule(name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
               loss_fn: LossFn, out_dim: int, total_steps: int, preset: str = "classification",
               **hparams: Any) -> LearningRule:
    """The rule registered as ``name``: ``preset`` (``"toy"`` or ``"classification"``,
    docs/algorithms.md#setting)
    supplies its hyper-parameters, ``hparams`` override them."""
    return RULES.get(name)(model, optimizer, loss_fn=loss_fn, out_dim=out_dim,
                           total_steps=total_steps, preset=preset, **hparams)
