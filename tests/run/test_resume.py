import pytest
import torch

from chimera.data import load_task
from chimera.run import trainer
from chimera.run.build import build_run_model
from chimera.run.checkpoint import load_checkpoint
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec
from chimera.run.trainer import train

RUNS = {
    "fp32": RunSpec("digits", "mlp", "adamw", seed=3, epochs=4, batch_size=128, log_every=3,
                    optimizer_hparams={"lr": 1e-2}, lr_schedule="cosine"),
    "chimera+controller": RunSpec(
        "digits", "mlp", "adamw", seed=1, epochs=4, batch_size=128, log_every=3,
        optimizer_hparams={"lr": 1e-2}, quantizer="chimera",
        quant_hparams={"warmup_steps": 10},
        controller={"target_bits": 1.32, "branch": "sparse", "frequency": "batch"}),
    "int_ternary": RunSpec("digits", "mlp", "scaled_optum", seed=2, epochs=4, batch_size=128,
                           log_every=3, optimizer_hparams={"lr": 1e-2}, quantizer="int_ternary"),
    # a learning rule resumes inside its DFA warm-up (warmup_frac 0.5 of 48 steps)
    "credit_bridge": RunSpec("digits", "resmlp", "adamw", seed=0, epochs=4, batch_size=128,
                             log_every=3, optimizer_hparams={"lr": 1e-3}, rule="credit_bridge",
                             model_hparams={"d_hidden": 16, "num_blocks": 2},
                             rule_hparams={"warmup_frac": 0.5, "bridge_hidden": 16, "K": 2}),
}
METRICS = ("test_accuracy", "test_loss", "best_test_accuracy", "steps")


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


class Crash(Exception):
    pass


def run(spec, path, ckpt, data, resume=False):
    with RecordWriter(path) as w:
        return train(spec, w, data=data, progress=False, checkpoint=ckpt, resume=resume)


def crash_in_epoch(monkeypatch, epoch):
    """Make the evaluation of ``epoch`` raise: the run dies after its step records."""
    calls = {"n": 0}
    real = trainer.evaluate

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate)


def params(spec, ckpt, data):
    model = build_run_model(spec, data.input_shape, data.num_classes)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    return model.state_dict()


def record_keys(path):
    return [(r["record_type"], r.get("epoch"), r.get("step")) for r in read_records(path)]


@pytest.mark.parametrize("name", RUNS)
def test_interrupted_then_resumed_equals_uninterrupted(name, tmp_path, monkeypatch, digits):
    spec = RUNS[name]
    ref = run(spec, tmp_path / "ref.jsonl", tmp_path / "ref.pt", digits)

    crash_in_epoch(monkeypatch, 3)
    with pytest.raises(Crash):
        run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "r.pt")["epoch"] == 2
    assert ("step", 3, 30) in record_keys(tmp_path / "r.jsonl")  # written after the checkpoint
    torch.manual_seed(123)  # the resumed run must not depend on the caller's RNG state
    final = run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)

    assert {k: final[k] for k in METRICS} == {k: ref[k] for k in METRICS}
    quant = [k for k in final if k.startswith(("quant_", "controller"))]
    assert {k: final[k] for k in quant} == {k: ref[k] for k in quant}
    a, b = params(spec, tmp_path / "ref.pt", digits), params(spec, tmp_path / "r.pt", digits)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = record_keys(tmp_path / "r.jsonl")
    assert keys == record_keys(tmp_path / "ref.jsonl")  # same records, none duplicated
    assert len(keys) == len(set(keys))
    ref_recs, recs = read_records(tmp_path / "ref.jsonl"), read_records(tmp_path / "r.jsonl")
    for r0, r1 in zip(ref_recs, recs, strict=True):
        if r0["record_type"] == "eval":
            assert r0["test_loss"] == r1["test_loss"]
        if r0["record_type"] == "step":
            assert r0["loss"] == r1["loss"] and r0["lr"] == r1["lr"]


def test_finished_checkpoint_resumes_to_the_same_final(tmp_path, digits):
    spec = RUNS["fp32"]
    ref = run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits)
    again = run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)
    assert again["test_loss"] == ref["test_loss"]
    assert [r["record_type"] for r in read_records(tmp_path / "r.jsonl")].count("final") == 1


def test_resume_without_checkpoint_starts_fresh_and_foreign_checkpoint_is_rejected(
    tmp_path, digits
):
    spec = RUNS["fp32"]
    first = run(spec, tmp_path / "a.jsonl", tmp_path / "a.pt", digits, resume=True)
    assert first["steps"] == 4 * 12
    other = RunSpec("digits", "mlp", "adamw", seed=4, epochs=4, batch_size=128)
    with pytest.raises(ValueError, match="another run spec"):
        run(other, tmp_path / "b.jsonl", tmp_path / "a.pt", digits, resume=True)


def test_a_checkpoint_of_the_earlier_layout_resumes_identically(tmp_path, digits):
    """Before callbacks kept their own state, a checkpoint held the controller and rule states at
    its top level and the quantizer statistics in its progress."""
    from chimera.run.checkpoint import save_checkpoint

    spec = RunSpec(**{**RUNS["chimera+controller"].to_dict(), "epochs": 2})
    full = run(spec, tmp_path / "full.jsonl", tmp_path / "full.pt", digits)
    short = RunSpec(**{**spec.to_dict(), "epochs": 1})
    run(short, tmp_path / "old.jsonl", tmp_path / "old.pt", digits)
    ckpt = load_checkpoint(tmp_path / "old.pt")
    states = ckpt.pop("callbacks")
    ckpt["controller"] = states["controller"]
    ckpt["rule"] = None
    ckpt["progress"]["quant"] = states["quant"]
    ckpt["spec"] = spec.to_dict()
    save_checkpoint(tmp_path / "old.pt", ckpt)
    resumed = run(spec, tmp_path / "old.jsonl", tmp_path / "old.pt", digits, resume=True)
    for key in (*METRICS, "quant_global_zero_ratio"):
        assert resumed[key] == full[key], key
