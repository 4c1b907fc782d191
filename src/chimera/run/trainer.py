"""The training loop shared by every command: one ``RunSpec`` in, records and final metrics out.

``Trainer(spec, writer).fit()`` sets the run up (:mod:`chimera.run.build`), resumes it from its
checkpoint if asked, trains epoch by epoch (cross-entropy, the spec's learning rule, forward
passes in the spec's precision), evaluates the task's validation split after every epoch and its
test split once, after the last, and writes step / epoch / eval / final records
(docs/records.md). Anything "best" is chosen on the validation split; no record holds a test
metric before the final one. A resumed run whose checkpoint is damaged restarts from scratch
with the bad files moved aside (:meth:`Trainer.fit`). What the quantizer, controller, optimizer
and learning rule add to the records comes from their callbacks (:mod:`chimera.run.callbacks`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import chimera
from chimera.data import TaskData, load_task
from chimera.optim import build_optimizer, optimizer_state_memory_summary
from chimera.run.build import (
    autocast,
    build_run_model,
    build_run_rule,
    build_step,
    lr_scheduler,
    resolve_device,
)
from chimera.run.callbacks import Callback, default_callbacks
from chimera.run.checkpoint import (
    CorruptCheckpointError,
    aside_path,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from chimera.run.records import RecordWriter
from chimera.run.spec import RunSpec

WARMUP_STEPS = 5  # steps excluded from the median step times


def identity_of(spec: RunSpec) -> dict[str, Any]:
    """Identity fields carried by every record of a run."""
    return {
        "run_id": spec.run_id,
        "config_id": spec.config_id,
        **spec.to_dict(),
        "versions": {"chimera": chimera.__version__, "torch": torch.__version__},
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             precision: str = "fp32", max_batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), or on its first ``max_batches``
    batches (forward in ``precision``); the model's mode is restored."""
    if max_batches is not None:
        x, y = x[: max_batches * batch_size], y[: max_batches * batch_size]
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


def _median_after_warmup(times: list[float]) -> float | None:
    tail = times[WARMUP_STEPS:] or times
    return statistics.median(tail) if tail else None


@dataclass
class Progress:
    """Counters of a run, saved in its checkpoints."""

    epoch: int = 0
    step: int = 0
    best_val_accuracy: float | None = None  # the highest validation accuracy so far ...
    best_val_epoch: int | None = None  # ... first reached at this epoch
    elapsed_s: float = 0.0
    step_times: list[float] = field(default_factory=list)
    opt_times: list[float] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    restarts: list[dict[str, Any]] = field(default_factory=list)  # after damaged checkpoints


class Trainer:
    """Trains one run spec; see the module docstring.

    ``data`` reuses an already loaded task. ``checkpoint`` is a path rewritten atomically at the
    end of every epoch with the whole training state (the last one is the trained run). With
    ``resume`` and an existing checkpoint, training continues after its epoch with identical
    results, and the writer's file is cut back to its size at that checkpoint (the records
    since are written again); a damaged checkpoint (:class:`CorruptCheckpointError`) is moved
    aside with the records and the run restarts from scratch (:meth:`fit`). ``callbacks`` are
    added to the run's default ones.
    """

    def __init__(
        self, spec: RunSpec, writer: RecordWriter | None = None, *, data: TaskData | None = None,
        progress: bool = True, checkpoint: str | os.PathLike | None = None,
        resume: bool = False, callbacks: Sequence[Callback] = (),
    ) -> None:
        self.spec, self.writer, self.show_progress = spec, writer, progress
        self.checkpoint, self.resume = checkpoint, resume
        device = resolve_device(spec.device)
        self.data = data if data is not None else load_task(spec.task)
        torch.manual_seed(spec.seed)
        self.model = build_run_model(spec, self.data.input_shape, self.data.num_classes)
        self.model.to(device)
        self.opt = build_optimizer(spec.optimizer, self.model, **spec.optimizer_hparams)
        self.log = writer.with_identity(**identity_of(spec)) if writer is not None else None
        self.x_train, self.y_train = self.data.x_train.to(device), self.data.y_train.to(device)
        self.x_val, self.y_val = self.data.x_val.to(device), self.data.y_val.to(device)
        self.x_test, self.y_test = self.data.x_test.to(device), self.data.y_test.to(device)
        self.gen = torch.Generator().manual_seed(spec.seed)
        self.steps_per_epoch = math.ceil(len(self.x_train) / spec.batch_size)
        if spec.max_batches is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, spec.max_batches)
        self.samples_per_epoch = min(len(self.x_train), self.steps_per_epoch * spec.batch_size)
        total_steps = spec.epochs * self.steps_per_epoch
        self.scheduler = lr_scheduler(self.opt, spec.lr_schedule, total_steps)
        self.rule = build_run_rule(spec, self.model, self.opt, self.data.num_classes, total_steps)
        self.step_fn = build_step(self.model, self.opt, self.rule, spec.precision)
        self.callbacks = [*default_callbacks(spec, self.model, self.opt, self.rule), *callbacks]
        self.progress = Progress()
        self._start = time.perf_counter()

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs and return the final record's metrics.

        With ``resume``: temporaries a killed checkpoint writer left are removed, then the run
        continues from its checkpoint, or, when that is damaged, restarts from scratch
        (:meth:`restart_after`). Any other refusal (another spec's checkpoint, a foreign file)
        raises.
        """
        if self.resume and self.checkpoint is not None:
            remove_stale_temporaries(self.checkpoint)
            if Path(self.checkpoint).exists():
                try:
                    self.restore(self.checkpoint)
                except CorruptCheckpointError as e:  # raised before any state is touched
                    self.restart_after(self.checkpoint, e)
        for cb in self.callbacks:
            cb.on_fit_start()
        self._start = time.perf_counter()
        epochs = range(self.progress.epoch + 1, self.spec.epochs + 1)
        bar = tqdm(epochs, desc=self.spec.run_id, disable=not self.show_progress, leave=False)
        for epoch in bar:
            train_loss, train_acc = self.train_epoch(epoch)
            ev = self.end_epoch(epoch, train_loss, train_acc)
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{ev['accuracy']:.3f}")
        return self.finish()

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the shuffled training split (its first ``max_batches`` batches when the
        spec limits them; the whole permutation is drawn either way); returns the mean loss and
        accuracy of the examples seen."""
        self.model.train()
        n, bs = len(self.x_train), self.spec.batch_size
        perm = torch.randperm(n, generator=self.gen).to(self.x_train.device)
        loss_sum, correct = 0.0, 0
        self._epoch_start = time.perf_counter()
        for i in range(self.steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            xb, yb = self.x_train[idx], self.y_train[idx]
            loss, logits = self.train_step(epoch, xb, yb)
            loss_sum += loss * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        return loss_sum / self.samples_per_epoch, correct / self.samples_per_epoch

    def train_step(self, epoch: int, xb: torch.Tensor, yb: torch.Tensor
                   ) -> tuple[float, torch.Tensor]:
        """One step: the rule's (or backprop's) update, the scheduler, the callbacks, and a step
        record every ``log_every`` steps."""
        p = self.progress
        t0 = time.perf_counter()
        loss, logits, opt_time = self.step_fn(xb, yb)
        step_time = time.perf_counter() - t0
        self.scheduler.step()
        p.step += 1
        for cb in self.callbacks:
            cb.on_step()
        p.step_times.append(step_time)
        if opt_time is not None:
            p.opt_times.append(opt_time)
        if self.log is not None and p.step % self.spec.log_every == 0:
            extra = {k: v for cb in self.callbacks for k, v in cb.step_fields().items()}
            self.log.write("step", epoch=epoch, step=p.step, loss=loss, step_time_s=step_time,
                           lr=self.opt.param_groups[0]["lr"], optimizer_step_time_s=opt_time,
                           **extra)
        return loss, logits

    def end_epoch(self, epoch: int, train_loss: float, train_acc: float) -> dict[str, float]:
        """Callbacks, the validation pass, the epoch and eval records and the checkpoint of an
        epoch."""
        p, n = self.progress, self.samples_per_epoch
        epoch_time = time.perf_counter() - self._epoch_start
        epoch_fields = {k: v for cb in self.callbacks for k, v in cb.on_epoch_end().items()}
        p.eval = self.evaluate_split(self.x_val, self.y_val)
        if p.best_val_accuracy is None or p.eval["accuracy"] > p.best_val_accuracy:
            p.best_val_accuracy, p.best_val_epoch = p.eval["accuracy"], epoch
        eval_fields = {k: v for cb in self.callbacks
                       for k, v in cb.on_eval(self.x_val, self.y_val).items()}
        if self.log is not None:
            self.log.write("epoch", epoch=epoch, step=p.step, train_loss=train_loss,
                           train_accuracy=train_acc, epoch_time_s=epoch_time,
                           throughput_samples_per_s=n / epoch_time, **epoch_fields)
            self.log.write("eval", epoch=epoch, step=p.step, val_loss=p.eval["loss"],
                           val_accuracy=p.eval["accuracy"], train_time_s=self._elapsed(),
                           **eval_fields)
        p.epoch = epoch
        if self.checkpoint is not None:
            self.save(self.checkpoint)
        return p.eval

    def evaluate_split(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """:func:`evaluate` on one split with the spec's batch size, precision and batch limit."""
        return evaluate(self.model, x, y, self.spec.eval_batch_size, self.spec.precision,
                        self.spec.eval_max_batches)

    def finish(self) -> dict[str, Any]:
        """The final record (written) and its metrics (returned): the last epoch's validation
        metrics, and the test split's, evaluated here once on the trained model."""
        p = self.progress
        n_params = sum(t.numel() for t in self.model.parameters())
        state = optimizer_state_memory_summary(self.opt)
        elapsed = self._elapsed()  # training and validation time; the test pass is not in it
        test = self.evaluate_split(self.x_test, self.y_test)
        final = {
            "epochs": self.spec.epochs, "steps": p.step,
            "val_loss": p.eval.get("loss"), "val_accuracy": p.eval.get("accuracy"),
            "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "best_val_accuracy": p.best_val_accuracy, "best_val_epoch": p.best_val_epoch,
            "train_time_s": elapsed,
            "median_step_time_s": _median_after_warmup(p.step_times),
            "median_optimizer_step_time_s": _median_after_warmup(p.opt_times),
            "num_params": n_params, "optimizer_state_bytes": state["total"],
            "optimizer_state": state, "state_bytes_per_param": state["total"] / max(n_params, 1),
            "quantizer_config": self.spec.quant_config.to_dict(),
        }
        for cb in self.callbacks:
            final.update(cb.final_fields())
        if p.restarts:
            final["restarts"] = p.restarts
        if self.log is not None:
            self.log.write("final", **final)
        return final

    def _elapsed(self) -> float:
        return self.progress.elapsed_s + time.perf_counter() - self._start

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the whole training state to ``path`` (atomically)."""
        progress = {**dataclasses.asdict(self.progress), "elapsed_s": self._elapsed(),
                    "record_bytes": os.path.getsize(self.writer.path) if self.writer else None}
        save_checkpoint(path, {
            "spec": self.spec.to_dict(), "quantizer_config": self.spec.quant_config.to_dict(),
            "input_shape": list(self.data.input_shape),
            "num_classes": self.data.num_classes, "epoch": self.progress.epoch,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "rng": {"torch": torch.get_rng_state(), "generator": self.gen.get_state()},
            "progress": progress,
        })

    def restart_after(self, path: str | os.PathLike, error: CorruptCheckpointError) -> None:
        """Move the damaged checkpoint ``path`` and the run's records aside (``<file>.corrupt-<UTC
        time>``; nothing is deleted), note the restart in the progress (the final record's
        ``restarts``) and warn on stderr in one line; the run then trains from scratch.

        The records (when not empty) go first (copied aside, then emptied: the writer keeps its
        file open), so a crash in between leaves the damaged checkpoint to be found again.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        records = None
        if self.writer is not None and os.path.getsize(self.writer.path) > 0:
            records = aside_path(self.writer.path, stamp)
            shutil.copyfile(self.writer.path, records)
            os.truncate(self.writer.path, 0)
        checkpoint = aside_path(path, stamp)
        os.replace(path, checkpoint)
        self.progress.restarts.append({"time": stamp, "reason": str(error),
                                       "checkpoint": str(checkpoint),
                                       "records": None if records is None else str(records)})
        moved = f"{checkpoint}" + ("" if records is None else f" and the records to {records}")
        print(f"chimera: warning: {error}; moved it to {moved}; restarting {self.spec.run_id} "
              "from scratch", file=sys.stderr, flush=True)

    def restore(self, path: str | os.PathLike) -> None:
        """Load the training state saved at ``path`` and cut the record file back to its size
        at that checkpoint."""
        ckpt = load_checkpoint(path)
        try:  # fields added since the checkpoint was written take their defaults
            same = RunSpec(**ckpt["spec"]) == self.spec
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(f"checkpoint {path} belongs to another run spec than "
                             f"{self.spec.run_id}")
        if "progress" not in ckpt:
            raise ValueError(f"checkpoint {path} has no training progress to resume from")
        states = _callback_states(ckpt)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        missing = [cb.name for cb in self.callbacks if cb.name not in states]
        if missing:
            raise ValueError(f"checkpoint {path} holds no state of {missing}; rerun it from the "
                             "start")
        for cb in self.callbacks:  # before the RNG: building a rule's state draws from it
            cb.load_state_dict(states[cb.name])
        self.gen.set_state(ckpt["rng"]["generator"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        saved = {k: v for k, v in ckpt["progress"].items() if k in Progress.__dataclass_fields__}
        size = ckpt["progress"]["record_bytes"]
        self.progress = Progress(**saved)
        if self.writer is not None:
            if size is None or size > os.path.getsize(self.writer.path):
                raise ValueError(f"record file {self.writer.path} is shorter than checkpoint "
                                 f"{path} says")
            os.truncate(self.writer.path, size)


def _callback_states(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The callbacks' states of a checkpoint; one written before callbacks kept them has the
    quantizer statistics in its progress and the controller and rule states at its top level."""
    if "callbacks" in ckpt:
        return ckpt["callbacks"]
    states = {"quant": ckpt["progress"].get("quant", {}), "optimizer": None}
    for name in ("controller", "rule"):
        if ckpt.get(name) is not None:
            states[name] = ckpt[name]
    return states


def train(spec: RunSpec, writer: RecordWriter | None = None, **options: Any) -> dict[str, Any]:
    """``Trainer(spec, writer, **options).fit()``: train ``spec`` and return its final metrics."""
    return Trainer(spec, writer, **options).fit()
