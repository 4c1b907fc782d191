"""From a run spec to the objects that train it: device, model, optimizer, learning rule,
scheduler and the per-batch step."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chimera.models import build_model
from chimera.nn.quantize import quantize_
from chimera.rules import LearningRule, build_rule
from chimera.run.spec import PRECISIONS, RunSpec

# step(x, y) -> (loss, logits, optimizer seconds or None when the rule steps its optimizer itself)
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[float, torch.Tensor, float | None]]


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, with a clear error for a CUDA device on a machine without one."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return device


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The run's precision context: ``torch.autocast(device_type, dtype=torch.bfloat16)`` for
    ``bf16`` (matmuls and convolutions in bf16, losses and reductions in fp32; parameters and
    optimizer state stay fp32), nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def lr_scheduler(
    opt: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule of every group's lr: ``constant``, or ``cosine`` from the group's lr
    to 0 over ``total_steps`` (``lr_t = lr * (1 + cos(pi * t / total)) / 2``)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)


def build_run_model(spec: RunSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model of a run: the registered model, converted by the run's quantizer."""
    model = build_model(spec.model, input_shape, num_classes, **spec.model_hparams)
    return quantize_(model, spec.quant_config)


def build_run_rule(
    spec: RunSpec, model: nn.Module, opt: torch.optim.Optimizer | None, num_classes: int,
    total_steps: int,
) -> LearningRule | None:
    """The run's learning rule (None for backprop, which the trainer runs inline)."""
    if spec.rule == "backprop":
        if spec.rule_hparams:
            raise ValueError(f"rule 'backprop' takes no rule_hparams, got {spec.rule_hparams}")
        return None
    return build_rule(spec.rule, model, opt, loss_fn=F.cross_entropy, out_dim=num_classes,
                      total_steps=total_steps, **spec.rule_hparams)


def build_step(
    model: nn.Module, opt: torch.optim.Optimizer, rule: LearningRule | None, precision: str
) -> StepFn:
    """One training step on a batch: backprop inline (any model), or the rule's ``train_step``
    (residual models), which does its own local backward passes and optimizer step.

    With ``precision`` bf16, backprop's forward and loss run under :func:`autocast`; a rule's
    whole ``train_step`` does (its backward passes follow the dtypes of the forward)."""
    device_type = next(model.parameters()).device.type
    if rule is None:
        def bp_step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor, float]:
            opt.zero_grad(set_to_none=True)
            with autocast(precision, device_type):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            t = time.perf_counter()
            opt.step()
            return loss.item(), logits.detach(), time.perf_counter() - t

        return bp_step

    def rule_step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor, None]:
        with autocast(precision, device_type):
            out = rule.train_step(x, y)
        return out["loss"], out["logits"], None

    return rule_step
