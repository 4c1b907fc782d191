import pytest
import torch

from chimera.run.build import build_run_model
from chimera.run.checkpoint import load_checkpoint, save_checkpoint
from chimera.run.spec import RunSpec
from chimera.run.trainer import train


def test_round_trip_and_no_temporary_files_left(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"spec": {}, "input_shape": [4], "num_classes": 2,
                                               "model": {"w": torch.ones(2)}})
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"spec": {}, "input_shape": [1], "num_classes": 2, "model": {"v": 1}})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"v": 2}})
    monkeypatch.undo()
    assert load_checkpoint(path)["model"] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_missing_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(tmp_path / "c.pt", {"spec": {}, "input_shape": [1], "num_classes": 2,
                                               "model": {}})
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a Chimera checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_trained_run_checkpoint_rebuilds_the_same_model(tmp_path):
    spec = RunSpec("digits", "mlp", "adamw", epochs=1, batch_size=64, quantizer="chimera",
                   optimizer_hparams={"lr": 1e-2})
    train(spec, progress=False, checkpoint=str(tmp_path / "run.pt"))
    ckpt = load_checkpoint(tmp_path / "run.pt")
    assert ckpt["spec"] == spec.to_dict()
    model = build_run_model(RunSpec(**ckpt["spec"]), tuple(ckpt["input_shape"]),
                            ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    x = torch.randn(5, 64)
    model.eval()
    assert torch.isfinite(model(x)).all()
