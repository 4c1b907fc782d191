"""``state_bridge``: a learned map from any state to the terminal state
(docs/algorithms.md#setting).

``G_psi(h, l)`` predicts ``h_L`` from ``h_l``; the credit is the vector-Jacobian product
``a_l = J_G(h_l)^T g_L`` with ``g_L = ∂ℓ/∂h_L`` of the real forward (output-local), computed
through G only, never through the forward net.

Design choices (left open by the rule's definition), see docs/rules.md:

- ``G(h, l) = h + MLP([h, emb(l)])`` (:class:`BridgeNet`, two GELU hidden
  layers of ``bridge_hidden``, sinusoidal layer embedding of ``emb_dim``) with a zero-initialised
  last layer: a residual network moves its state by a sum of branches, so G starts as the
  identity (credit ``g_L`` at every layer) and learns the correction.
- Training: each of the ``K`` noisy copies ``h_l + sigma_bridge·ε`` of every example starts at
  its own layer l drawn uniformly from 0..L, and is pushed through the real blocks l..L-1
  without gradient (eval mode); the loss is the normalised MSE
  ``mean ||G(h_l + σε, l) − target||² / max(||target||, 1)²``. One random layer per copy is an
  unbiased estimate of the all-layer loss at 1/(L+1) of its cost.
- Adam with ``lr_fb``. No DFA warm-up by default (``warmup_frac`` 0 in both presets, as the
  research code we reimplement warms up the credit bridge only); on MNIST-1D the classification
  preset's 0.2 cost it 11 points of validation accuracy (docs/rules.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from chimera.rules.learning_rule import (
    RULES,
    BridgeNet,
    LearningRule,
    Terminal,
    frozen,
    normalised_sq_error,
)


@RULES.register("state_bridge")
class StateBridge(LearningRule):
    """Credit ``J_G^T g_L`` from a learned terminal-state predictor ``G``."""

    name = "state_bridge"
    hparam_names = ("sigma_bridge", "K", "lr_fb", "warmup_frac", "bridge_hidden", "emb_dim")
    preset_overrides = {"warmup_frac": 0.0}  # no DFA warm-up unless asked (docs/rules.md)

    def _build_feedback(self, hs: list[Tensor]) -> None:
        size = hs[0][0].numel()
        hp = self.hparams
        self.bridge = BridgeNet(size, 0, size, hp["bridge_hidden"], hp["emb_dim"], len(hs),
                                residual_state=True).to(hs[0].device)
        self.bridge_opt = torch.optim.Adam(self.bridge.parameters(), lr=hp["lr_fb"])

    def _feedback_parts(self) -> dict[str, Any]:
        return {**super()._feedback_parts(), "bridge": self.bridge, "bridge_opt": self.bridge_opt}

    def _own_credits(self, hs: list[Tensor], c: Tensor, term: Terminal) -> list[Tensor]:
        batch = len(hs[0])
        h = torch.cat(hs).detach().requires_grad_(True)
        layers = torch.arange(len(hs), device=h.device).repeat_interleave(batch)
        with torch.enable_grad():
            out = self.bridge(h, layers)
            g = term.grad_h.flatten(1).repeat(len(hs), 1)
            (a,) = torch.autograd.grad(out, h, grad_outputs=g)
        return list(a.split(batch))

    def _train_feedback(self, hs: list[Tensor], c: Tensor, term: Terminal) -> dict[str, Any]:
        k, sigma = self.hparams["K"], self.hparams["sigma_bridge"]
        states = torch.stack(hs)  # (L+1, B, *S)
        batch = states.shape[1]
        start, order = torch.randint(0, len(hs), (k * batch,), device=states.device).sort()
        example = torch.arange(batch, device=states.device).repeat(k)[order]
        noisy = states[start, example] + sigma * torch.randn_like(states[start, example])
        target = self._rollout(noisy, start)
        loss = normalised_sq_error(self.bridge(noisy, start), target)
        self.bridge_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.bridge_opt.step()
        return {"bridge_residual": loss.item()}

    @torch.no_grad()
    def _rollout(self, h: Tensor, start: Tensor) -> Tensor:
        """Push rows (sorted by ``start``) through blocks start..L-1: at block j the rows with
        ``start <= j`` are a prefix."""
        h = h.clone()
        ends = torch.searchsorted(start, torch.arange(1, self.num_blocks + 1, device=h.device))
        with frozen(self.model):
            for block, end in zip(self.model.blocks, ends.tolist(), strict=True):
                h[:end] = h[:end] + block(h[:end])
        return h
