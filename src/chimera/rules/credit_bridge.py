"""``credit_bridge``: a learned value of the state, credit = its gradient
(docs/algorithms.md#setting).

``V_phi(h, l, c)`` estimates the terminal loss reachable from state h at layer l with context c;
the credit is ``a_l = ∇_h V_phi(h_l, l, c)``. Training (one Adam step of ``lr_fb`` per call):

(i)   terminal value match ``V(h_L, L, c) ≈ ℓ_i = ℓ(head(h_L), c)`` per example;
(ii)  terminal gradient matching ``∇_h V(h_L, L, c) ≈ ∂ℓ_i/∂h_L`` (weight ``term_grad_weight``);
(iii) bridge consistency for l < L: ``V(h_l, l, c) ≈ −λ·log mean_k exp(−V_ema(s_k + f_l(s_k),
      l+1, c)/λ)`` with ``s_k = h_l + σ·ε_k`` (k = 1..K, blocks in eval mode, no gradient),
      ``V_ema`` an EMA copy of V (``θ_ema ← m·θ_ema + (1−m)·θ`` after every step);
(iv)  slope consistency ``∇_h V(h_l, l, c) ≈ ∇_{h_l} target`` (weight ``slope_weight``);
(v)   flow matching (weight ``fm_weight``): no cost accrues inside a block, so V is constant
      along the straight path ``h_t = h_l + t·(h_{l+1} − h_l)``, t ~ U(0, 1), at the fractional
      layer l + t: ``V(h_t, l + t, c) ≈ V_ema(h_{l+1}, l+1, c)``.

Every term is a normalised squared error ``(pred − target)² / max(|target|, 1)²`` (a vector's
norm for (ii) and (iv)), averaged over examples, summed (ii, iv, v weighted); the sum is the
bridge residual.

Design choices (left open by the rule's definition), see docs/rules.md:

- ``V`` is a plain scalar MLP of ``z = [h, emb(l), c]`` (:class:`BridgeNet`,
  two GELU hidden layers of ``bridge_hidden``; c one-hot for labels, the target vector for the
  toy LQ). On the toy it learned the credit faster than a ``½‖u‖²`` value head or an added
  linear skip (docs/rules.md).
- (iii) and (v) each use one layer per example per step, drawn uniformly from 0..L-1 (an
  unbiased estimate of the all-layer loss at 1/L of its cost); (i) and (ii) use every example.
- The DFA warm-up blend over the first ``warmup_frac`` of the steps.
"""

from __future__ import annotations

import copy
import math
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
    per_example_loss,
)


def soft_min(values: Tensor, lam: float) -> Tensor:
    """``−λ·log mean_k exp(−values_k/λ)`` over the last dim (min as λ → 0, mean as λ → ∞)."""
    return -lam * (torch.logsumexp(-values / lam, dim=-1) - math.log(values.shape[-1]))


@RULES.register("credit_bridge")
class CreditBridge(LearningRule):
    """Credit ``∇_h V`` from a learned terminal-loss estimator ``V``."""

    name = "credit_bridge"
    hparam_names = ("sigma_bridge", "lam", "K", "term_grad_weight", "slope_weight", "fm_weight",
                    "grad_floor", "ema_momentum", "lr_fb", "fb_steps", "warmup_frac",
                    "bridge_hidden", "emb_dim")

    def _build_feedback(self, hs: list[Tensor]) -> None:
        hp = self.hparams
        self.value_net = BridgeNet(hs[0][0].numel(), self.out_dim, 1, hp["bridge_hidden"],
                                   hp["emb_dim"], len(hs)).to(hs[0].device)
        self.value_ema = copy.deepcopy(self.value_net).requires_grad_(False)
        self.value_opt = torch.optim.Adam(self.value_net.parameters(), lr=hp["lr_fb"])

    def _feedback_parts(self) -> dict[str, Any]:
        return {**super()._feedback_parts(), "value_net": self.value_net,
                "value_ema": self.value_ema, "value_opt": self.value_opt}

    def _value(self, net: BridgeNet, h: Tensor, layers: Tensor, ctx: Tensor) -> Tensor:
        return net(h, layers, ctx).squeeze(1)

    def _own_credits(self, hs: list[Tensor], c: Tensor, term: Terminal) -> list[Tensor]:
        batch, n = len(hs[0]), len(hs)
        h = torch.cat(hs).detach().requires_grad_(True)
        layers = torch.arange(n, device=h.device).repeat_interleave(batch)
        with torch.enable_grad():
            v = self._value(self.value_net, h, layers, self._context(c).repeat(n, 1))
            (a,) = torch.autograd.grad(v.sum(), h)
        return list(a.split(batch))

    def _train_feedback(self, hs: list[Tensor], c: Tensor, term: Terminal) -> dict[str, Any]:
        """``fb_steps`` Adam steps of V (each followed by the EMA update) on this batch."""
        for _ in range(self.hparams["fb_steps"]):
            info = self._value_step(hs, c, term)
        return info

    def _value_step(self, hs: list[Tensor], c: Tensor, term: Terminal) -> dict[str, Any]:
        hp = self.hparams
        ctx, batch, last = self._context(c), len(hs[0]), len(hs) - 1
        with torch.enable_grad():
            h_last = hs[-1].detach().requires_grad_(True)
            layer_last = torch.full((batch,), last, device=ctx.device)
            v_last = self._value(self.value_net, h_last, layer_last, ctx)
            loss = normalised_sq_error(v_last, per_example_loss(self.loss_fn, term.y, c))
            if hp["term_grad_weight"] > 0:
                (grad,) = torch.autograd.grad(v_last.sum(), h_last, create_graph=True)
                loss = loss + hp["term_grad_weight"] * normalised_sq_error(
                    grad, term.grad_h * batch, hp["grad_floor"])
            if last > 0:
                layer, h_l, ctx_l, target, slope = self._consistency_target(hs, ctx)
                h_l.requires_grad_(hp["slope_weight"] > 0)
                v_l = self._value(self.value_net, h_l, layer, ctx_l)
                loss = loss + normalised_sq_error(v_l, target)
                if hp["slope_weight"] > 0:
                    (grad,) = torch.autograd.grad(v_l.sum(), h_l, create_graph=True)
                    loss = loss + hp["slope_weight"] * normalised_sq_error(
                        grad, slope, hp["grad_floor"])
                if hp["fm_weight"] > 0:
                    loss = loss + hp["fm_weight"] * self._flow_loss(hs, ctx)
        self.value_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.value_opt.step()
        with torch.no_grad():
            m = hp["ema_momentum"]
            for p_ema, p in zip(self.value_ema.parameters(), self.value_net.parameters(),
                                strict=True):
                p_ema.lerp_(p, 1.0 - m)
        return {"bridge_residual": loss.item()}

    def _flow_loss(self, hs: list[Tensor], ctx: Tensor) -> Tensor:
        """Term (v): ``V(h_l + t·(h_{l+1} − h_l), l + t, c) ≈ V_ema(h_{l+1}, l+1, c)``, one layer
        l < L and one t ~ U(0, 1) per example."""
        batch, device = len(hs[0]), hs[0].device
        layer = torch.randint(0, len(hs) - 1, (batch,), device=device)
        example = torch.arange(batch, device=device)
        states = torch.stack(hs).detach()
        h_l, h_next = states[layer, example], states[layer + 1, example]
        t = torch.rand(batch, device=device)
        h_t = torch.lerp(h_l, h_next, t.view(-1, *[1] * (h_l.dim() - 1)))
        with torch.no_grad():
            target = self._value(self.value_ema, h_next, layer + 1, ctx)
        return normalised_sq_error(self._value(self.value_net, h_t, layer + t, ctx), target)

    def _consistency_target(self, hs: list[Tensor], ctx: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """One layer l < L per example (sorted): ``(l, h_l, c, soft-min target, slope)``;
        ``slope`` is the target's gradient w.r.t. h_l (one block's VJP; None when unused)."""
        k, sigma = self.hparams["K"], self.hparams["sigma_bridge"]
        batch, device = len(hs[0]), hs[0].device
        layer, example = torch.randint(0, len(hs) - 1, (batch,), device=device).sort()
        h_l, ctx_l = torch.stack(hs)[layer, example].detach(), ctx[example]
        start = h_l.repeat_interleave(k, 0)
        start = (start + sigma * torch.randn_like(start)).requires_grad_(
            self.hparams["slope_weight"] > 0)
        ends = torch.searchsorted(layer, torch.arange(1, len(hs), device=device)) * k
        with frozen(self.model), torch.set_grad_enabled(start.requires_grad):
            starts = [0, *ends.tolist()[:-1]]
            noisy = torch.cat([start[lo:hi] + block(start[lo:hi]) for block, lo, hi
                               in zip(self.model.blocks, starts, ends.tolist(), strict=True)])
            v_next = self._value(self.value_ema, noisy, layer.repeat_interleave(k) + 1,
                                 ctx_l.repeat_interleave(k, 0)).view(batch, k)
            target = soft_min(v_next, self.hparams["lam"])
            slope = None
            if start.requires_grad:
                (g,) = torch.autograd.grad(target.sum(), start)
                slope = g.view(batch, k, *g.shape[1:]).sum(1)
        return layer, h_l, ctx_l, target.detach(), slope
