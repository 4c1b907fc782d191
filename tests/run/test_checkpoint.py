import pytest
import torch

from chimera.run.build import build_run_model
from chimera.run.checkpoint import (
    CHECKPOINT_FORMAT,
    HEADER,
    CorruptCheckpointError,
    aside_path,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
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


# ---- integrity ---------------------------------------------------------------------------

def payload():
    torch.manual_seed(0)
    return {"spec": {"task": "digits"}, "input_shape": [64], "num_classes": 10,
            "model": {"w": torch.randn(40, 30), "b": torch.randn(30)}, "epoch": 1}


def one_line_error(path, kind=ValueError):
    """The error loading ``path`` raises: of type ``kind`` (exactly, for ValueError), one line,
    naming the file."""
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert type(info.value) is kind
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_flipped_byte_anywhere_in_the_file_is_detected(tmp_path):
    data = save_checkpoint(tmp_path / "c.pt", payload()).read_bytes()
    positions = sorted({round(i * (len(data) - 1) / 29) for i in range(30)})
    assert len(positions) == 30 and positions[0] == 0 and positions[-1] == len(data) - 1
    bad = tmp_path / "bad.pt"
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01  # the smallest change: one bit
        bad.write_bytes(bytes(flipped))
        assert "corrupt checkpoint" in one_line_error(bad, CorruptCheckpointError), pos


def test_a_sign_flipped_float_is_detected(tmp_path):
    """The failure of the issue: flipped signs in the weights left a loadable file."""
    path = save_checkpoint(tmp_path / "c.pt", payload())
    data = bytearray(path.read_bytes())
    raw = payload()["model"]["w"].numpy().tobytes()
    start = bytes(data).find(raw[:64])
    assert start > 0
    for i in range(16):  # the sign bit of 16 float32 values (little-endian: the last byte)
        data[start + 4 * i + 3] ^= 0x80
    path.write_bytes(bytes(data))
    assert "digest mismatch" in one_line_error(path, CorruptCheckpointError)


@pytest.mark.parametrize("keep", [0, 1, 10, HEADER.size - 1, HEADER.size, HEADER.size + 1,
                                  1000, "half", -1])
def test_truncations_are_detected(keep, tmp_path):
    data = save_checkpoint(tmp_path / "c.pt", payload()).read_bytes()
    keep = {"half": len(data) // 2, -1: len(data) - 1}.get(keep, keep)
    (tmp_path / "t.pt").write_bytes(data[:keep])
    assert "truncated" in one_line_error(tmp_path / "t.pt", CorruptCheckpointError)


def test_extra_bytes_garbage_and_legacy_damage_are_corrupt(tmp_path):
    data = save_checkpoint(tmp_path / "c.pt", payload()).read_bytes()
    (tmp_path / "long.pt").write_bytes(data + b"\0")
    one_line_error(tmp_path / "long.pt", CorruptCheckpointError)
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    assert "neither" in one_line_error(tmp_path / "garbage.pt", CorruptCheckpointError)
    torch.save({"format": CHECKPOINT_FORMAT, **payload()}, tmp_path / "legacy.pt")
    legacy = (tmp_path / "legacy.pt").read_bytes()
    for keep in (len(legacy) // 3, len(legacy) - 30):
        (tmp_path / "cut.pt").write_bytes(legacy[:keep])
        one_line_error(tmp_path / "cut.pt", CorruptCheckpointError)


def test_a_legacy_checkpoint_without_digest_loads_unverified(tmp_path):
    torch.save({"format": CHECKPOINT_FORMAT, **payload()}, tmp_path / "legacy.pt")
    ckpt = load_checkpoint(tmp_path / "legacy.pt")
    assert torch.equal(ckpt["model"]["w"], payload()["model"]["w"]) and ckpt["epoch"] == 1


def test_foreign_files_and_folders_are_plain_value_errors(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "foreign.pt")
    assert "not a Chimera checkpoint" in one_line_error(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "partial.pt", {"spec": {}})
    assert "lacks 'input_shape'" in one_line_error(tmp_path / "partial.pt")
    (tmp_path / "dir.pt").mkdir()
    assert "is a directory" in one_line_error(tmp_path / "dir.pt")
    with pytest.raises(ValueError, match="is a directory"):
        save_checkpoint(tmp_path / "dir.pt", payload())


def test_stale_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    stale = [tmp_path / ".c.pt.k1ll3d.tmp", tmp_path / ".c.pt.x.tmp"]
    for p in stale:
        p.write_bytes(b"")  # a writer killed before it wrote anything
    others = [tmp_path / ".d.pt.k1ll3d.tmp", tmp_path / "c.pt.tmp", tmp_path / ".c.pt.keep"]
    for p in others:
        p.write_bytes(b"x")
    save_checkpoint(tmp_path / "c.pt", payload())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["c.pt", *(p.name for p in others)])
    stale[0].write_bytes(b"")
    assert remove_stale_temporaries(tmp_path / "c.pt") == [stale[0]]
    assert not stale[0].exists() and load_checkpoint(tmp_path / "c.pt")["epoch"] == 1


def test_aside_path_never_reuses_a_name(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"x")
    first = aside_path(tmp_path / "c.pt", "T1")
    assert first.name == "c.pt.corrupt-T1"
    first.write_bytes(b"y")
    assert aside_path(tmp_path / "c.pt", "T1").name == "c.pt.corrupt-T1-2"
