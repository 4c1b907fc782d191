"""Batch limits per epoch (``max_batches``, ``eval_max_batches``), the target-bits controller on by
default for quantizer chimera, and run ids that stay put when neither is used."""

import dataclasses

import pytest
import torch

from chimera.data import load_task
from chimera.run import trainer
from chimera.run.build import build_run_model
from chimera.run.checkpoint import load_checkpoint
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec
from chimera.run.trainer import evaluate, train

LIMITED = RunSpec("digits", "mlp", "adamw", seed=5, epochs=3, batch_size=32, eval_batch_size=50,
                  log_every=2, optimizer_hparams={"lr": 1e-2}, max_batches=4,
                  eval_max_batches=2, quantizer="chimera",
                  controller={"frequency": "batch", "affects": "alpha_override"})


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def run(spec, path, data, **options):
    with RecordWriter(path) as w:
        return train(spec, w, data=data, progress=False, **options)


def test_batch_limits_cut_every_epoch_and_every_evaluation(tmp_path, digits):
    final = run(LIMITED, tmp_path / "r.jsonl", digits, checkpoint=tmp_path / "r.pt")
    assert final["steps"] == 3 * 4
    epochs = read_records(tmp_path / "r.jsonl", "epoch")
    assert [e["step"] for e in epochs] == [4, 8, 12]
    model = build_run_model(LIMITED, digits.input_shape, digits.num_classes)
    model.load_state_dict(load_checkpoint(tmp_path / "r.pt")["model"])
    first_100 = evaluate(model, digits.x_test[:100], digits.y_test[:100], 50)
    assert final["test_loss"] == pytest.approx(first_100["loss"], rel=1e-6)
    assert final["test_accuracy"] == first_100["accuracy"]
    whole = evaluate(model, digits.x_test, digits.y_test, 50)
    assert whole["loss"] != pytest.approx(first_100["loss"], rel=1e-6)


def test_a_limited_run_resumes_mid_run_identically(tmp_path, monkeypatch, digits):
    ref = run(LIMITED, tmp_path / "ref.jsonl", digits, checkpoint=tmp_path / "ref.pt")
    real, calls = trainer.evaluate, {"n": 0}

    def crash_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", crash_in_epoch_2)
    with pytest.raises(Crash):
        run(LIMITED, tmp_path / "r.jsonl", digits, checkpoint=tmp_path / "r.pt", resume=True)
    monkeypatch.undo()
    torch.manual_seed(7)
    final = run(LIMITED, tmp_path / "r.jsonl", digits, checkpoint=tmp_path / "r.pt", resume=True)
    for key in ("test_loss", "test_accuracy", "steps", "quant_global_zero_ratio"):
        assert final[key] == ref[key], key
    same = ("record_type", "epoch", "step", "loss", "train_loss", "test_loss", "controller_alpha")
    ref_recs, recs = read_records(tmp_path / "ref.jsonl"), read_records(tmp_path / "r.jsonl")
    assert [{k: r.get(k) for k in same} for r in recs] == [
        {k: r.get(k) for k in same} for r in ref_recs]


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_batches": 0}, "max_batches must be a positive integer"),
    ({"eval_max_batches": -1}, "eval_max_batches must be a positive integer"),
    ({"max_batches": 2.0}, "max_batches"),
    ({"max_batches": True}, "max_batches"),
    ({"eval_max_batches": "3"}, "eval_max_batches"),
    ({"quantizer": "chimera", "controller": True}, "controller must be a table"),
    ({"quantizer": "strict_bitnet", "controller": "off"}, "controller must be a table"),
])
def test_bad_limits_and_controllers_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        RunSpec("digits", "mlp", "adamw", **fields)


def test_new_fields_at_their_defaults_keep_existing_run_ids():
    base = RunSpec("digits", "mlp", "adamw")
    assert base.run_id == "digits-mlp-adamw-000ac75b-s0"  # the id before the fields existed
    assert dataclasses.replace(base, max_batches=None, eval_max_batches=None) == base
    limited = {dataclasses.replace(base, max_batches=5).run_id,
               dataclasses.replace(base, eval_max_batches=5).run_id,
               dataclasses.replace(base, max_batches=5, eval_max_batches=5).run_id}
    assert len(limited) == 3 and base.run_id not in limited


def test_chimera_runs_the_controller_by_default_and_ids_follow_the_controller_used():
    def spec(quantizer, **fields):
        return RunSpec("digits", "mlp", "adamw", quantizer=quantizer, **fields)

    assert spec("chimera").controller_config == {}
    assert spec("strict_bitnet").controller_config is None
    assert spec("fp32").controller_config is None
    assert spec("chimera", controller=False).controller_config is None
    assert spec("strict_bitnet", controller={"target_bits": 1.0}).controller_config == {
        "target_bits": 1.0}
    # ids of the same training coincide; the ids below are those the specs had before the
    # default changed (chimera without a controller, chimera with the default controller)
    assert spec("chimera", controller=False).run_id == "digits-mlp-adamw-8f450ca8-s0"
    assert spec("chimera").run_id == spec("chimera", controller={}).run_id
    assert spec("chimera").run_id == "digits-mlp-adamw-4a0b7bff-s0"
    assert spec("strict_bitnet").run_id == "digits-mlp-adamw-b1de8b9b-s0"
    assert spec("strict_bitnet", controller=False).run_id == spec("strict_bitnet").run_id


def first_step(spec, tmp_path, data):
    one = dataclasses.replace(spec, epochs=1, max_batches=2, log_every=1)
    run(one, tmp_path / f"{spec.controller}.jsonl", data)
    return read_records(tmp_path / f"{spec.controller}.jsonl", "step")[0]


def test_default_controller_records_and_can_be_turned_off(tmp_path, digits):
    spec = RunSpec("digits", "mlp", "adamw", quantizer="chimera", quant_hparams={"skip": []})
    on = first_step(spec, tmp_path, digits)
    assert on["controller_alpha"] == pytest.approx(0.7)
    off = first_step(dataclasses.replace(spec, controller=False), tmp_path, digits)
    assert "controller_alpha" not in off and "quant_alpha_mean" in off


def test_the_override_controller_runs_the_first_forward_at_its_alpha(tmp_path, digits):
    """As in the original project: with ``affects = "alpha_override"`` the first forward uses
    the controller's initial alpha (the layers' alpha_target), not the warm-up's alpha_min."""
    spec = RunSpec("digits", "mlp", "adamw", quantizer="chimera",
                   quant_hparams={"skip": [], "alpha_target": 0.6, "alpha_min": 0.1},
                   controller={"affects": "alpha_override"})
    step = first_step(spec, tmp_path, digits)
    assert step["quant_alpha_mean"] == pytest.approx(0.6)
    assert step["controller_alpha"] == pytest.approx(0.6)
    target = first_step(dataclasses.replace(spec, controller={"affects": "alpha_target"}),
                        tmp_path, digits)
    assert target["quant_alpha_mean"] == pytest.approx(0.1)  # the warm-up starts at alpha_min
