"""Hugging Face ``Trainer`` runs Chimera's optimizers both ways (``optimizers=(opt, sched)`` and
``optimizer_cls_and_kwargs``) on a ternarized tiny BERT, and resuming from a checkpoint ends
with the weights and optimizer state of the uninterrupted run; gradient accumulation of an
integer-ternary model under ScaledOptum equals one big batch."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import (
    TinyClassifier,
    assert_same_optimizer_state,
    assert_same_tensors,
    tiny_bert_config,
    token_dataset,
    vector_dataset,
)
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from chimera import STAC, Chimera21, ScaledOptum, ternarize
from chimera.nn import BitLinear, IntTernaryLinear


def _args(out, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                    use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
                    logging_steps=100, weight_decay=0.01, lr_scheduler_type="constant")
    return TrainingArguments(**{**settings, **overrides})


def _ternary_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    ternarize(model, "chimera", skip=["classifier"], warmup_steps=0)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, BitLinear)
    return model


def _with_optimizers(kind: str):
    def make(out) -> Trainer:
        model = _ternary_bert()
        if kind == "chimera21":
            opt = Chimera21(model.parameters(), lr=1e-2)
        else:
            opt = STAC(model, lr=1e-2)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.25, total_iters=4)
        return Trainer(model=model, args=_args(out), train_dataset=token_dataset(),
                       optimizers=(opt, sched))

    return make


def _with_cls_and_kwargs(kind: str):
    """Chimera21 takes the Trainer's weight-decay groups; STAC partitions the model itself, so
    its kwargs carry ``model`` (the Trainer passes it in place of the groups)."""

    def make(out) -> Trainer:
        model = _ternary_bert()
        cls_and_kwargs = (Chimera21, {"lr": 1e-2}) if kind == "chimera21" else (
            STAC, {"model": model, "lr": 1e-2})
        return Trainer(model=model, args=_args(out), train_dataset=token_dataset(),
                       optimizer_cls_and_kwargs=cls_and_kwargs)

    return make


@pytest.mark.parametrize("kind", ["chimera21", "stac"])
@pytest.mark.parametrize("way", [_with_optimizers, _with_cls_and_kwargs],
                         ids=["optimizers", "optimizer_cls_and_kwargs"])
def test_trainer_resume_matches_uninterrupted_run(tmp_path, way, kind):
    make = way(kind)
    full = make(tmp_path / "full")
    full.train()
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert type(full.optimizer.optimizer) is (Chimera21 if kind == "chimera21" else STAC)
    assert full.state.global_step == resumed.state.global_step == 4
    assert_same_tensors(full.model.state_dict(), resumed.model.state_dict(), "weights")
    assert_same_optimizer_state(full.optimizer.optimizer, resumed.optimizer.optimizer)
    start = _ternary_bert().state_dict()
    moved = [k for k, v in full.model.state_dict().items() if k.endswith("weight_master")
             and not torch.equal(v, start[k])]
    assert moved, "training did not move the ternary layers' latent weights"


def _int_ternary_run(out, batch: int, accumulation: int) -> Trainer:
    torch.manual_seed(0)
    model = ternarize(TinyClassifier(), "int_ternary", skip=[], act_quant="per_token")
    assert sum(isinstance(m, IntTernaryLinear) for m in model.modules()) == 3
    opt = ScaledOptum.for_model(model, lr=1e-2, threshold=4, ternary_lr=2.0)
    args = _args(out, max_steps=3, per_device_train_batch_size=batch,
                 gradient_accumulation_steps=accumulation, save_strategy="no", weight_decay=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=vector_dataset(),
                      optimizers=(opt, None))
    trainer.train()
    return trainer


def test_gradient_accumulation_of_int_ternary_model_equals_one_big_batch(tmp_path):
    big = _int_ternary_run(tmp_path / "big", batch=8, accumulation=1)
    accumulated = _int_ternary_run(tmp_path / "acc", batch=4, accumulation=2)
    a, b = big.model.state_dict(), accumulated.model.state_dict()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    start = ternarize(TinyClassifier(), "int_ternary", skip=[], act_quant="per_token")
    assert any(not torch.equal(a[k], v) for k, v in start.state_dict().items()
               if k.endswith((".T", ".pressure"))), "the ternary state never moved"
