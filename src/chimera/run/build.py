"""From a run spec to the objects that train it: device, model, optimizer, learning rule,
scheduler and the per-batch step; and :func:`probe_run`, which builds them all once on the side
so that a bad setting is one ``ValueError`` line before a run starts."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from chimera.data import TaskData
from chimera.models import build_model
from chimera.nn.quantize import AlphaControl, quantize_
from chimera.optim import build_optimizer
from chimera.rules import LearningRule, build_rule
from chimera.run.spec import PRECISIONS, RunSpec, check_device

# step(x, y) -> (loss, logits, optimizer seconds or None when the rule steps its optimizer itself)
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[float, torch.Tensor, float | None]]


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)`` of a valid device string (:func:`check_device`), with a clear error
    for a CUDA device on a machine without one."""
    device = torch.device(check_device(name))
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
    """The run's learning rule (None for backprop, which the trainer runs inline; the spec
    rejects rule_hparams for it)."""
    if spec.rule == "backprop":
        return None
    return build_rule(spec.rule, model, opt, loss_fn=F.cross_entropy, out_dim=num_classes,
                      total_steps=total_steps, **spec.rule_hparams)


def build_step(
    model: nn.Module, opt: torch.optim.Optimizer, rule: LearningRule | None, precision: str
) -> StepFn:
    """One training step on a batch: backprop inline, or the rule's ``train_step``, which does
    its own backward passes and optimizer step (any model for the feedback rules, residual
    models for the bridges).

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


PROBE_EXAMPLES = 2  # training examples of the probe step


@contextlib.contextmanager
def _part(what: str) -> Iterator[None]:
    """Errors of building or stepping ``what`` as one ``ValueError`` line naming it (a
    ``ValueError`` already names its argument and passes unchanged)."""
    try:
        yield
    except (TypeError, RuntimeError, ArithmeticError, IndexError, KeyError, AssertionError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{what}: {detail}") from None


def probe_run(spec: RunSpec, data: TaskData) -> None:
    """Build what a run of ``spec`` on ``data`` builds (the model and its quantization, the
    optimizer, the controller, the learning rule) on the CPU and take one backprop step on the
    first training examples, leaving the global RNG as it was. A value that only its target
    notices (a model that does not fit the task, a learning rate that overflows, a skip rule
    that converts nothing) raises one ``ValueError`` line here, before any run starts."""
    resolve_device(spec.device)
    x = data.x_train[:PROBE_EXAMPLES].cpu()
    y = data.y_train[:PROBE_EXAMPLES].cpu()
    with torch.random.fork_rng(devices=[]):
        with _part(f"model '{spec.model}' with {spec.model_hparams}"):
            model = build_run_model(spec, data.input_shape, data.num_classes)
        with _part(f"optimizer '{spec.optimizer}' with {spec.optimizer_hparams}"):
            opt = build_optimizer(spec.optimizer, model, **spec.optimizer_hparams)
        if spec.controller_config is not None:
            AlphaControl(model, spec.controller_config)
        with _part(f"rule '{spec.rule}' with {spec.rule_hparams}"):
            build_run_rule(spec, model, opt, data.num_classes, total_steps=1)
        with _part(f"model '{spec.model}' on task '{spec.task}'"), \
                autocast(spec.precision, "cpu"):
            loss = F.cross_entropy(model(x), y)
        with _part(f"a step of optimizer '{spec.optimizer}' with {spec.optimizer_hparams}"):
            loss.backward()
            opt.step()
