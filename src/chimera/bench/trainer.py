"""The training loop shared by every command: one ``RunSpec`` in, records and final metrics out."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import chimera
from chimera.bench.checkpoint import load_checkpoint, save_checkpoint
from chimera.bench.quant_control import AlphaControl, quant_record, quantize_model
from chimera.bench.records import RecordWriter
from chimera.bench.spec import PRECISIONS, RunSpec
from chimera.data import TaskData, load_task
from chimera.models import build_model
from chimera.optim import (
    ScaledOptum,
    build_optimizer,
    optimizer_state_memory_summary,
    scaled_optum_state_bytes_per_weight,
)
from chimera.rules import LearningRule, build_rule, credit_diagnostics

WARMUP_STEPS = 5  # steps excluded from the median step times


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, with a clear error for a CUDA device on a machine without one."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return device


def identity_of(spec: RunSpec) -> dict[str, Any]:
    """Identity fields carried by every record of a run."""
    return {
        "run_id": spec.run_id,
        "config_id": spec.config_id,
        **spec.to_dict(),
        "versions": {"chimera": chimera.__version__, "torch": torch.__version__},
    }


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The run's precision context: ``torch.autocast(device_type, dtype=torch.bfloat16)`` for
    ``bf16`` (matmuls and convolutions in bf16, losses and reductions in fp32; parameters and
    optimizer state stay fp32), nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             precision: str = "fp32") -> dict:
    """Mean cross-entropy and accuracy of ``model`` on (x, y) (forward in ``precision``); the
    model's mode is restored."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        with autocast(precision, x.device.type):
            logits = model(x[i : i + batch_size])
        loss_sum += F.cross_entropy(logits.float(), y[i : i + batch_size],
                                    reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}


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
    return quantize_model(model, spec.quantizer, spec.quant_hparams)


DIAG_EXAMPLES = 256  # test examples on which credit diagnostics are measured each epoch


def step_function(
    spec: RunSpec, model: nn.Module, opt: torch.optim.Optimizer, num_classes: int,
    total_steps: int,
) -> tuple[Any, LearningRule | None]:
    """``(step(x, y) -> (loss, logits, optimizer_seconds | None), rule)`` for the run's learning
    rule: plain backprop inline (any model), or a rule of :mod:`chimera.rules` (residual models:
    stem / blocks / head), which does its own local backward passes and optimizer step.

    With ``precision`` bf16, backprop's forward and loss run under :func:`autocast`; a rule's
    whole ``train_step`` does (its forward passes and losses, and the backward passes that follow
    them, which autograd runs in the dtypes of the forward)."""
    device_type = next(model.parameters()).device.type
    if spec.rule == "backprop":
        def bp_step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor, float]:
            opt.zero_grad(set_to_none=True)
            with autocast(spec.precision, device_type):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            t = time.perf_counter()
            opt.step()
            return loss.item(), logits.detach(), time.perf_counter() - t

        return bp_step, None
    rule = build_rule(spec.rule, model, opt, loss_fn=F.cross_entropy, out_dim=num_classes,
                      total_steps=total_steps, **spec.rule_hparams)

    def rule_step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor, None]:
        with autocast(spec.precision, device_type):
            out = rule.train_step(x, y)
        return out["loss"], out["logits"], None

    return rule_step, rule


def _credit_record(rule: LearningRule, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    """Credit diagnostics against exact costates (SPEC 3.2), prefixed ``credit_``; a private
    generator keeps the training RNG stream untouched."""
    diag = credit_diagnostics(rule, x[:DIAG_EXAMPLES], y[:DIAG_EXAMPLES],
                              generator=torch.Generator().manual_seed(seed))
    return {f"credit_{k}": v for k, v in diag.items()}


def _median_after_warmup(times: list[float]) -> float | None:
    tail = times[WARMUP_STEPS:] or times
    return statistics.median(tail) if tail else None


def _resume_state(
    path: str, spec: RunSpec, writer: RecordWriter | None, parts: dict[str, Any]
) -> dict[str, Any]:
    """Restore ``parts`` (model, opt, scheduler, gen, control, rule) from the checkpoint at
    ``path``, cut the record file back to its size at that checkpoint, and return the saved
    counters."""
    ckpt = load_checkpoint(path)
    try:  # fields added since the checkpoint was written take their defaults
        same = RunSpec(**ckpt["spec"]) == spec
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(f"checkpoint {path} belongs to another run spec than {spec.run_id}")
    if "progress" not in ckpt:
        raise ValueError(f"checkpoint {path} has no training progress to resume from")
    parts["model"].load_state_dict(ckpt["model"])
    parts["opt"].load_state_dict(ckpt["optimizer"])
    parts["scheduler"].load_state_dict(ckpt["scheduler"])
    if parts["rule"] is not None:
        if ckpt.get("rule") is None:
            raise ValueError(f"checkpoint {path} holds no '{spec.rule}' rule state (written by "
                             "an older version); rerun it from the start")
        parts["rule"].load_state_dict(ckpt["rule"])  # before the RNG: building draws from it
    parts["gen"].set_state(ckpt["rng"]["generator"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if parts["control"] is not None:
        parts["control"].alpha = ckpt["controller"]["alpha"]
        parts["control"].controller.load_state_dict(ckpt["controller"]["state"])
    progress = ckpt["progress"]
    if writer is not None:
        size = progress["record_bytes"]
        if size is None or size > os.path.getsize(writer.path):
            raise ValueError(f"record file {writer.path} is shorter than checkpoint {path} says")
        os.truncate(writer.path, size)
    return progress


def train(
    spec: RunSpec,
    writer: RecordWriter | None = None,
    *,
    data: TaskData | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``spec`` (cross-entropy, the spec's learning rule, forward passes in the spec's
    precision); write step/epoch/eval/final records (non-backprop rules add credit diagnostics,
    measured in fp32, to eval and final records).

    Returns the final record's metrics. ``data`` may be passed to reuse an already loaded task.
    ``checkpoint`` is a path rewritten atomically at the end of every epoch with the whole
    training state (the last one is the trained run). With ``resume`` and an existing
    checkpoint, training continues after its epoch with identical results, and the writer's
    file is cut back to its size at that checkpoint (the records since are written again).
    A learning rule's state (feedback networks, their optimizers, step count) is part of the
    checkpoint.
    """
    device = resolve_device(spec.device)
    data = data if data is not None else load_task(spec.task)
    torch.manual_seed(spec.seed)
    model = build_run_model(spec, data.input_shape, data.num_classes).to(device)
    opt = build_optimizer(spec.optimizer, model, **spec.optimizer_hparams)
    control = AlphaControl(model, spec.controller) if spec.controller is not None else None
    log = writer.with_identity(**identity_of(spec)) if writer is not None else None

    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    gen = torch.Generator().manual_seed(spec.seed)
    n, bs = len(x_train), spec.batch_size
    steps_per_epoch = math.ceil(n / bs)
    scheduler = lr_scheduler(opt, spec.lr_schedule, spec.epochs * steps_per_epoch)
    train_step, rule = step_function(spec, model, opt, data.num_classes,
                                     spec.epochs * steps_per_epoch)
    credit: dict[str, Any] = {}
    run: dict[str, Any] = {"epoch": 0, "step": 0, "best_acc": 0.0, "elapsed_s": 0.0,
                             "step_times": [], "opt_times": [], "eval": {}, "quant": {}}
    if resume and checkpoint is not None and Path(checkpoint).exists():
        run = _resume_state(str(checkpoint), spec, writer, {
            "model": model, "opt": opt, "scheduler": scheduler, "gen": gen, "control": control,
            "rule": rule})
    step, best_acc, start = run["step"], run["best_acc"], time.perf_counter()
    step_times: list[float] = run["step_times"]
    opt_times: list[float] = run["opt_times"]
    ev: dict[str, float] = run["eval"]
    quant: dict[str, Any] = run["quant"]

    def save(epoch: int) -> None:
        save_checkpoint(checkpoint, {
            "spec": spec.to_dict(), "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "epoch": epoch,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "controller": None if control is None else {
                "alpha": control.alpha, "state": control.controller.state_dict()},
            "rule": None if rule is None else rule.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": gen.get_state()},
            "progress": {
                "epoch": epoch, "step": step, "best_acc": best_acc, "eval": ev, "quant": quant,
                "elapsed_s": run["elapsed_s"] + time.perf_counter() - start,
                "step_times": step_times, "opt_times": opt_times,
                "record_bytes": os.path.getsize(writer.path) if writer is not None else None,
            },
        })

    epochs = range(run["epoch"] + 1, spec.epochs + 1)
    bar = tqdm(epochs, desc=spec.run_id, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum, correct = 0.0, 0
        epoch_start = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            xb, yb = x_train[idx], y_train[idx]
            t0 = time.perf_counter()
            loss_value, logits, opt_time = train_step(xb, yb)
            t2 = time.perf_counter()
            scheduler.step()
            step += 1
            if control is not None and control.frequency == "batch":
                control.update(model)
            step_times.append(t2 - t0)
            if opt_time is not None:
                opt_times.append(opt_time)
            loss_sum += loss_value * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            if log is not None and step % spec.log_every == 0:
                diag = getattr(opt, "last_diagnostics", None) or {}
                log.write(
                    "step", epoch=epoch, step=step, loss=loss_value, step_time_s=t2 - t0,
                    lr=opt.param_groups[0]["lr"], optimizer_step_time_s=opt_time,
                    **{f"opt_{k}": v for k, v in diag.items()}, **quant_record(model),
                    **(control.record() if control is not None else {}),
                )
        epoch_time = time.perf_counter() - epoch_start
        train_loss, train_acc = loss_sum / n, correct / n
        quant = quant_record(model)  # stats of the last training forward, before eval runs
        if control is not None and control.frequency == "epoch":
            control.update(model)
        ev = evaluate(model, x_test, y_test, spec.eval_batch_size, spec.precision)
        best_acc = max(best_acc, ev["accuracy"])
        if rule is not None:
            credit = _credit_record(rule, x_test, y_test, spec.seed)
        if log is not None:
            log.write(
                "epoch", epoch=epoch, step=step, train_loss=train_loss, train_accuracy=train_acc,
                epoch_time_s=epoch_time, throughput_samples_per_s=n / epoch_time, **quant,
                **(control.record() if control is not None else {}),
            )
            log.write("eval", epoch=epoch, step=step, test_loss=ev["loss"],
                      test_accuracy=ev["accuracy"], **credit)
        bar.set_postfix(loss=f"{train_loss:.3f}", test_acc=f"{ev['accuracy']:.3f}")
        if checkpoint is not None:
            save(epoch)

    n_params = sum(p.numel() for p in model.parameters())
    state = optimizer_state_memory_summary(opt)
    final = {
        "epochs": spec.epochs,
        "steps": step,
        "test_loss": ev.get("loss"),
        "test_accuracy": ev.get("accuracy"),
        "best_test_accuracy": best_acc,
        "train_time_s": run["elapsed_s"] + time.perf_counter() - start,
        "median_step_time_s": _median_after_warmup(step_times),
        "median_optimizer_step_time_s": _median_after_warmup(opt_times),
        "num_params": n_params,
        "optimizer_state_bytes": state["total"],
        "optimizer_state": state,
        "state_bytes_per_param": state["total"] / max(n_params, 1),
        **quant,
        **credit,
    }
    if isinstance(opt, ScaledOptum):
        final["ternary_state_bytes_per_weight"] = scaled_optum_state_bytes_per_weight(opt)
    if log is not None:
        log.write("final", **final)
    return final
