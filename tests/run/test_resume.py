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
    # a learning rule resumes inside its DFA warm-up (warmup_frac 0.5 of 44 steps)
    "credit_bridge": RunSpec("digits", "resmlp", "adamw", seed=0, epochs=4, batch_size=128,
                             log_every=3, optimizer_hparams={"lr": 1e-3}, rule="credit_bridge",
                             model_hparams={"d_hidden": 16, "num_blocks": 2},
                             rule_hparams={"warmup_frac": 0.5, "bridge_hidden": 16, "K": 2}),
}
METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "best_val_accuracy",
           "best_val_epoch", "steps")


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
            assert r0["val_loss"] == r1["val_loss"]
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
    assert first["steps"] == 4 * 11  # 1293 training examples, batches of 128
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


# ---- damaged checkpoints -------------------------------------------------------------------

def flip_bytes(path, count=16):
    """Invert ``count`` bytes spread over the file (the last one included)."""
    data = bytearray(path.read_bytes())
    for i in range(1, count + 1):
        data[i * (len(data) - 1) // count] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def test_a_damaged_checkpoint_restarts_the_run_from_scratch(tmp_path, monkeypatch, capsys,
                                                           digits):
    spec = RunSpec(**{**RUNS["fp32"].to_dict(), "epochs": 3})
    ref = run(spec, tmp_path / "ref.jsonl", tmp_path / "ref.pt", digits)
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(Crash):
        run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)
    monkeypatch.undo()
    old_records = (tmp_path / "r.jsonl").read_bytes()
    assert load_checkpoint(tmp_path / "r.pt")["epoch"] == 1
    damaged = flip_bytes(tmp_path / "r.pt")
    (tmp_path / ".r.pt.k1ll3d.tmp").write_bytes(b"")  # a writer killed mid-checkpoint
    capsys.readouterr()

    final = run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)

    assert {k: final[k] for k in METRICS} == {k: ref[k] for k in METRICS}
    assert record_keys(tmp_path / "r.jsonl") == record_keys(tmp_path / "ref.jsonl")
    assert [r["record_type"] for r in read_records(tmp_path / "r.jsonl")].count("final") == 1
    aside = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert [n.split(".corrupt-")[0] for n in aside] == ["r.jsonl", "r.pt"]
    assert (tmp_path / aside[1]).read_bytes() == damaged  # moved, not rewritten
    assert (tmp_path / aside[0]).read_bytes() == old_records
    assert not (tmp_path / ".r.pt.k1ll3d.tmp").exists()
    assert load_checkpoint(tmp_path / "r.pt")["epoch"] == 3
    (restart,) = final["restarts"]
    assert restart["checkpoint"] == str(tmp_path / aside[1])
    assert restart["records"] == str(tmp_path / aside[0])
    assert "digest mismatch" in restart["reason"]
    assert read_records(tmp_path / "r.jsonl", record_type="final")[0]["restarts"] == [restart]
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and str(tmp_path / "r.pt") in warning[0]
    assert warning[0].startswith("chimera: warning: corrupt checkpoint")
    assert "restarts" not in ref


def test_the_restart_note_survives_a_later_resume(tmp_path, monkeypatch, digits):
    spec = RunSpec(**{**RUNS["fp32"].to_dict(), "epochs": 3})
    ref = run(spec, tmp_path / "ref.jsonl", tmp_path / "ref.pt", digits)
    for epoch in (2, 3):  # dies after the checkpoint of epoch 1; the restarted run in epoch 3
        crash_in_epoch(monkeypatch, epoch)
        with pytest.raises(Crash):
            run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)
        monkeypatch.undo()
        if epoch == 2:
            (tmp_path / "r.pt").write_bytes((tmp_path / "r.pt").read_bytes()[:-100])
    assert load_checkpoint(tmp_path / "r.pt")["epoch"] == 2
    (tmp_path / ".r.pt.k1ll3d.tmp").write_bytes(b"")
    final = run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)
    assert {k: final[k] for k in METRICS} == {k: ref[k] for k in METRICS}
    assert len(final["restarts"]) == 1 and "truncated" in final["restarts"][0]["reason"]
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 2
    assert not (tmp_path / ".r.pt.k1ll3d.tmp").exists()


def test_a_foreign_file_at_the_checkpoint_path_is_refused_not_moved(tmp_path, digits):
    torch.save({"state_dict": {}}, tmp_path / "r.pt")
    with pytest.raises(ValueError, match="not a Chimera checkpoint"):
        run(RUNS["fp32"], tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "r.pt"]


def test_a_sweep_run_with_a_damaged_checkpoint_restarts(tmp_path, monkeypatch, digits):
    """The sweep's job (``spec_call``) resumes through ``Trainer.fit`` and so restarts too."""
    from chimera.bench.suite.execute import spec_call

    spec = RunSpec(**{**RUNS["fp32"].to_dict(), "epochs": 2})
    ref = run(spec, tmp_path / "ref.jsonl", tmp_path / "ref.pt", digits)
    fn, args = spec_call(spec, tmp_path, resume=True)
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(Crash):
        fn(*args)
    monkeypatch.undo()
    flip_bytes(tmp_path / "checkpoints" / f"{spec.run_id}.pt")
    result = fn(*args)
    assert {k: result[k] for k in METRICS} == {k: ref[k] for k in METRICS}
    recs = read_records(tmp_path / f"{spec.run_id}.jsonl", record_type="final")
    assert len(recs) == 1 and len(recs[0]["restarts"]) == 1


def test_a_legacy_checkpoint_file_without_digest_still_resumes(tmp_path, monkeypatch, digits):
    spec = RunSpec(**{**RUNS["fp32"].to_dict(), "epochs": 2})
    ref = run(spec, tmp_path / "ref.jsonl", tmp_path / "ref.pt", digits)
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(Crash):
        run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits)
    monkeypatch.undo()
    torch.save(load_checkpoint(tmp_path / "r.pt"), tmp_path / "r.pt")  # the pre-digest layout
    assert (tmp_path / "r.pt").read_bytes().startswith(b"PK")
    final = run(spec, tmp_path / "r.jsonl", tmp_path / "r.pt", digits, resume=True)
    assert {k: final[k] for k in METRICS} == {k: ref[k] for k in METRICS}
    assert "restarts" not in final


def test_a_damaged_checkpoint_without_a_record_writer_restarts(tmp_path, digits, capsys):
    spec = RunSpec(**{**RUNS["fp32"].to_dict(), "epochs": 1})
    ref = train(spec, data=digits, progress=False, checkpoint=tmp_path / "r.pt")
    (tmp_path / "r.pt").write_bytes(b"")  # a file system that lost the data
    final = train(spec, data=digits, progress=False, checkpoint=tmp_path / "r.pt", resume=True)
    assert final["test_loss"] == ref["test_loss"]
    assert final["restarts"][0]["records"] is None
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.glob("*.corrupt-*")] == ["r.pt"]
    assert "r.pt" in capsys.readouterr().err
