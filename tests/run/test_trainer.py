import math

import pytest
import torch

from chimera.cli import main
from chimera.data import load_task
from chimera.optim import OPTIMIZERS
from chimera.run.build import build_run_model
from chimera.run.callbacks import Callback
from chimera.run.checkpoint import load_checkpoint, save_checkpoint
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec
from chimera.run.trainer import evaluate, train

LRS = {"sgd": 0.1, "lion": 1e-3, "stac": 1e-3}


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def spec(optimizer="adamw", seed=0, epochs=2, **kw):
    return RunSpec("digits", "mlp", optimizer, seed=seed, epochs=epochs, batch_size=64,
                   optimizer_hparams={"lr": LRS.get(optimizer, 1e-2)}, log_every=5, **kw)


def test_records_of_a_run(tmp_path, digits):
    path = tmp_path / "runs.jsonl"
    with RecordWriter(path) as w:
        final = train(spec(), w, data=digits, progress=False)
    recs = read_records(path)
    types = [r["record_type"] for r in recs]
    assert types.count("epoch") == 2 and types.count("eval") == 2 and types[-1] == "final"
    assert types.count("step") == (2 * math.ceil(len(digits.x_train) / 64)) // 5
    assert {r["run_id"] for r in recs} == {spec().run_id}
    assert all(r["versions"]["torch"] and r["seed"] == 0 for r in recs)
    assert recs[-1]["test_accuracy"] == final["test_accuracy"] > 0.8
    assert recs[-1]["val_accuracy"] == final["val_accuracy"] > 0.8
    state = final["optimizer_state"]  # AdamW: fp32 m and v, plus a 4-byte step per tensor
    assert state["m"] == state["v"] == 4 * final["num_params"] and state["psi"] == 0
    assert state["other"] == 4 * 6  # the mlp has 3 weights + 3 biases
    assert final["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-2)


def _test_keys(record):
    return sorted(k for k in record if "test" in k)


def test_selection_uses_validation_and_only_the_final_record_holds_test_metrics(tmp_path, digits):
    """Eval records carry val_loss / val_accuracy and no test metric; the final record carries the
    last epoch's validation metrics, the best validation accuracy with its epoch, and the test
    metrics of the trained model; no record has a ``best_test*`` key."""
    path, ckpt = tmp_path / "r.jsonl", tmp_path / "r.pt"
    seen = []

    class Spy(Callback):
        def on_eval(self, x, y):
            seen.append((x, y))
            return {}

    with RecordWriter(path) as w:
        final = train(spec(epochs=3, lr_schedule="cosine"), w, data=digits, progress=False,
                      checkpoint=ckpt, callbacks=[Spy()])
    assert len(seen) == 3  # callbacks (the rules' credit diagnostics) see the validation split
    assert all(torch.equal(x, digits.x_val) and torch.equal(y, digits.y_val) for x, y in seen)
    recs = read_records(path)
    assert not [k for r in recs for k in r if k.startswith("best_test")]
    assert [_test_keys(r) for r in recs if r["record_type"] != "final"] == [[]] * (len(recs) - 1)
    assert _test_keys(recs[-1]) == ["test_accuracy", "test_loss"]
    evals = [r for r in recs if r["record_type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    assert all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in evals)
    times = [r["train_time_s"] for r in evals]  # training seconds so far, the final's clock
    assert times == sorted(times) and 0 < times[-1] <= final["train_time_s"]
    assert (final["val_loss"], final["val_accuracy"]) == (evals[-1]["val_loss"],
                                                          evals[-1]["val_accuracy"])
    best = max(evals, key=lambda r: r["val_accuracy"])  # the first of equal maxima
    assert (final["best_val_accuracy"], final["best_val_epoch"]) == (best["val_accuracy"],
                                                                     best["epoch"])
    model = build_run_model(spec(), digits.input_shape, digits.num_classes)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    for split in ("val", "test"):
        x, y = getattr(digits, f"x_{split}"), getattr(digits, f"y_{split}")
        metrics = evaluate(model, x, y, 256)
        assert final[f"{split}_loss"] == pytest.approx(metrics["loss"], rel=1e-6)
        assert final[f"{split}_accuracy"] == metrics["accuracy"]


def test_same_seed_same_result_other_seed_differs(digits):
    a = train(spec(seed=1), data=digits, progress=False)
    b = train(spec(seed=1), data=digits, progress=False)
    c = train(spec(seed=2), data=digits, progress=False)
    assert a["test_loss"] == b["test_loss"]
    assert a["test_loss"] != c["test_loss"]


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_registered_optimizer_trains(name, digits):
    final = train(spec(name, epochs=3), data=digits, progress=False)
    assert final["test_accuracy"] > 0.5  # chance is 0.1


def test_chimera21_diagnostics_reach_step_records(tmp_path, digits):
    s = RunSpec("digits", "mlp", "chimera21", epochs=1, batch_size=64, log_every=5,
                optimizer_hparams={"log_diagnostics": True})
    with RecordWriter(tmp_path / "r.jsonl") as w:
        train(s, w, data=digits, progress=False)
    step = read_records(tmp_path / "r.jsonl", record_type="step")[0]
    assert 0.5 <= step["opt_mean_kappa"] <= 2.0 and "opt_collision_score" in step


def test_cuda_without_cuda_is_a_clear_error(digits):
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(spec(device="cuda"), data=digits, progress=False)


@pytest.mark.parametrize("rule", ["dfa", "state_bridge", "credit_bridge"])
def test_rules_train_a_resmlp_and_log_credit_diagnostics(rule, digits, tmp_path):
    s = RunSpec("digits", "resmlp", "adamw", epochs=2, batch_size=64, rule=rule,
                optimizer_hparams={"lr": 1e-3}, model_hparams={"d_hidden": 32, "num_blocks": 2})
    with RecordWriter(tmp_path / "r.jsonl") as w:
        final = train(s, w, data=digits, progress=False)
    evals = read_records(tmp_path / "r.jsonl", record_type="eval")
    assert len(evals) == 2 and all(-1 <= r["credit_costate_cosine"] <= 1 for r in evals)
    assert all(0 <= r["val_accuracy"] <= 1 and "test_accuracy" not in r for r in evals)
    assert "credit_perturbation_rho" in final and "credit_nudging" in final
    assert math.isfinite(final["test_loss"]) and math.isfinite(final["val_loss"])
    assert final["best_val_epoch"] in (1, 2) and "best_test_accuracy" not in final


def test_rule_errors(digits, tmp_path):
    with pytest.raises(ValueError, match="unknown learning rule 'hebb'"):
        train(spec(rule="hebb"), data=digits, progress=False)
    with pytest.raises(ValueError, match="stem"):  # the mlp has no stem / blocks / head
        train(spec(rule="state_bridge"), data=digits, progress=False)
    s = RunSpec("digits", "resmlp", "adamw", epochs=1, batch_size=64, rule="dfa",
                model_hparams={"d_hidden": 16, "num_blocks": 1})
    ckpt = tmp_path / "c.pt"
    train(s, data=digits, progress=False, checkpoint=ckpt)
    payload = load_checkpoint(ckpt)
    del payload["callbacks"]["rule"]  # a checkpoint without the rule's state
    save_checkpoint(ckpt, payload)
    with pytest.raises(ValueError, match=r"holds no state of \['rule'\]"):
        train(s, data=digits, progress=False, checkpoint=ckpt, resume=True)


def test_bf16_run_trains_and_records_its_precision(tmp_path, digits):
    s = spec(epochs=3, precision="bf16")
    with RecordWriter(tmp_path / "r.jsonl") as w:
        final = train(s, w, data=digits, progress=False)
    epochs = read_records(tmp_path / "r.jsonl", record_type="epoch")
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert final["test_accuracy"] > 0.8
    assert {r["precision"] for r in read_records(tmp_path / "r.jsonl")} == {"bf16"}
    assert s.run_id != spec(epochs=3).run_id  # bf16 is part of the run's identity


def test_precision_default_keeps_existing_run_ids_and_bad_values_are_rejected():
    assert RunSpec("digits", "mlp", "adamw").run_id == "digits-mlp-adamw-000ac75b-s0"
    assert RunSpec("digits", "mlp", "adamw", precision="fp32").run_id.endswith("000ac75b-s0")
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\)"):
        spec(precision="fp16")


def test_bf16_learning_rule_run_trains(digits):
    s = RunSpec("digits", "resmlp", "adamw", epochs=1, batch_size=64, rule="dfa",
                precision="bf16", optimizer_hparams={"lr": 1e-3},
                model_hparams={"d_hidden": 16, "num_blocks": 1})
    final = train(s, data=digits, progress=False)
    assert math.isfinite(final["test_loss"]) and -1 <= final["credit_costate_cosine"] <= 1


def test_checkpoint_written_before_the_precision_field_still_resumes(tmp_path, digits):
    s, ckpt = spec(epochs=1), tmp_path / "c.pt"
    first = train(s, data=digits, progress=False, checkpoint=ckpt)
    old = load_checkpoint(ckpt)
    del old["spec"]["precision"]
    save_checkpoint(ckpt, old)
    assert train(s, data=digits, progress=False, checkpoint=ckpt, resume=True)[
        "test_loss"] == first["test_loss"]
    with pytest.raises(ValueError, match="belongs to another run spec"):
        train(spec(epochs=1, precision="bf16"), data=digits, progress=False, checkpoint=ckpt,
              resume=True)


def test_train_command_precision_option(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = ["train", "--task", "digits", "--model", "mlp", "--epochs", "1", "--quiet",
            "--out", str(out)]
    assert main([*args, "--precision", "fp16"]) == 2
    assert "chimera: error: precision must be one of ('fp32', 'bf16')" in capsys.readouterr().err
    assert main([*args, "--precision", "bf16"]) == 0
    assert {r["precision"] for r in read_records(out)} == {"bf16"}
