import json
import math
from pathlib import Path

import pytest
import torch

from chimera.run.records import RecordWriter, read_records, without_time
from chimera.run.spec import RunSpec


def test_writer_flushes_each_record_and_reader_round_trips(tmp_path):
    path = tmp_path / "r.jsonl"
    w = RecordWriter(path, identity={"run_id": "a"})
    w.write("step", step=1, loss=torch.tensor(0.5))
    # flushed: readable before close
    recs = read_records(path)
    assert [without_time(r) for r in recs] == [
        {"run_id": "a", "record_type": "step", "step": 1, "loss": 0.5}]
    w.with_identity(seed=3).write("final", loss=float("nan"), acc=math.inf)
    w.close()
    recs = read_records(path)
    assert without_time(recs[1]) == {"run_id": "a", "seed": 3, "record_type": "final", "loss": None,
                       "acc": None}
    assert read_records(path, record_type="final") == [recs[1]]


def test_unknown_record_type_rejected(tmp_path):
    with RecordWriter(tmp_path / "r.jsonl") as w, pytest.raises(ValueError, match="record_type"):
        w.write("bogus")


def test_partial_tail_is_ignored_by_reader_and_cut_by_writer(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"record_type": "step", "step": 1}) + '\n{"record_type": "st')
    skipped = []
    assert read_records(path, skipped=skipped) == [{"record_type": "step", "step": 1}]
    assert skipped == []  # a crash mid-write is expected, not corruption
    with RecordWriter(path) as w:
        w.write("step", step=2)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_corrupt_middle_lines_are_skipped_and_reported_with_their_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"record_type": "step", "step": 1}\nnot json\n[1, 2]\n{"a": 1}\n'
                    '{"record_type": "bogus"}\n\n{"record_type": "final", "acc": 0.5}\n'
                    '{"record_type": "fin')
    skipped = []
    recs = read_records(path, skipped=skipped)
    assert recs == [{"record_type": "step", "step": 1}, {"record_type": "final", "acc": 0.5}]
    assert [(s.path, s.lineno) for s in skipped] == [(path, 2), (path, 3), (path, 4), (path, 5)]
    assert [s.reason for s in skipped] == [
        "not JSON (Expecting value)", "not a JSON object", "record_type missing or unknown",
        "record_type missing or unknown"]
    assert skipped[0] == (path, 2, "not JSON (Expecting value)")  # a plain tuple too
    # without a list to report to, the same records come back, filtered as asked
    assert read_records(path, record_type="final") == [recs[1]]


def test_garbage_bytes_are_skipped_per_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"record_type": "step", "step": 1}\n\xff\xfe\x00garbage\n'
                     b'\x00\x00\x00\x00\n{"record_type": "final", "step": 2}\n')
    skipped = []
    assert [r["step"] for r in read_records(path, skipped=skipped)] == [1, 2]
    assert [(s.lineno, s.reason) for s in skipped] == [
        (2, "not UTF-8"), (3, "not JSON (Expecting value)")]


def _one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_whole_file_problems_are_one_line_errors_naming_the_file(tmp_path, monkeypatch):
    for name in ("a", "b"):
        with RecordWriter(tmp_path / f"{name}.jsonl") as w:
            w.write("final", name=name)
    assert [r["name"] for r in read_records(tmp_path)] == ["a", "b"]
    _one_line_error(lambda: read_records(tmp_path / "missing.jsonl"), "not found.*missing")
    (tmp_path / "sub").mkdir()
    _one_line_error(lambda: read_records([tmp_path / "a.jsonl", tmp_path / "sub"]),
                    r"sub is a directory")
    (tmp_path / "odd.jsonl").mkdir()  # a folder scan meets a directory named like a file
    _one_line_error(lambda: read_records(tmp_path), r"odd.jsonl is a directory")
    (tmp_path / "odd.jsonl").rmdir()

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    _one_line_error(lambda: read_records(tmp_path / "a.jsonl"),
                    r"cannot read record file .*a.jsonl: Permission denied")


def test_run_id_is_deterministic_and_seed_only_changes_suffix():
    a = RunSpec("mnist1d", "cnn", "adamw", seed=0, optimizer_hparams={"lr": 0.01})
    b = RunSpec("mnist1d", "cnn", "adamw", seed=0, optimizer_hparams={"lr": 0.01})
    c = RunSpec("mnist1d", "cnn", "adamw", seed=1, optimizer_hparams={"lr": 0.01})
    d = RunSpec("mnist1d", "cnn", "adamw", seed=0, optimizer_hparams={"lr": 0.02})
    assert a.run_id == b.run_id
    assert a.config_id == c.config_id and a.run_id != c.run_id
    assert a.config_id != d.config_id
    assert a.run_id.startswith("mnist1d-cnn-adamw-") and a.run_id.endswith("-s0")


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("seed", -1),
                                         ("log_every", 0)])
def test_run_spec_rejects_impossible_values(field, value):
    with pytest.raises(ValueError, match=field):
        RunSpec("mnist1d", "cnn", "adamw", **{field: value})


def test_every_record_carries_its_utc_write_time(tmp_path, monkeypatch):
    from datetime import UTC, datetime, timedelta

    path = tmp_path / "r.jsonl"
    before = datetime.now(UTC) - timedelta(seconds=1)
    with RecordWriter(path, identity={"run_id": "a"}) as w:
        w.write("step", step=1)
        monkeypatch.setattr("chimera.run.records.utc_now", lambda: "2030-01-01T00:00:00.000Z")
        w.with_identity(seed=0).write("final", acc=0.5)
    first, last = read_records(path)
    assert first["time"].endswith("Z") and len(first["time"]) == len("2025-01-31T12:00:00.123Z")
    stamp = datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
    assert before <= stamp <= datetime.now(UTC)
    assert last["time"] == "2030-01-01T00:00:00.000Z"
    assert without_time(last) == {"run_id": "a", "seed": 0, "record_type": "final", "acc": 0.5}


class _ListSink:
    def __init__(self):
        self.seen, self.closed = [], False

    def write(self, record, identity):
        self.seen.append((record, sorted(identity)))

    def close(self):
        self.closed = True


def test_sinks_get_each_flushed_record_with_its_identity_names(tmp_path):
    sink = _ListSink()
    path = tmp_path / "r.jsonl"
    with RecordWriter(path, identity={"run_id": "a"}, sinks=[sink]) as w:
        w.write("step", step=1, loss=torch.tensor(0.25))
        w.with_identity(seed=3).write("final", acc=math.nan)
        assert not sink.closed
    assert sink.closed
    assert [rec for rec, _ in sink.seen] == read_records(path)  # what the file holds, cleaned
    assert [names for _, names in sink.seen] == [["run_id"], ["run_id", "seed"]]


def test_tensorboard_sink_scalars_skip_identity_and_bookkeeping(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from chimera.run.records import TensorBoardSink

    with RecordWriter(tmp_path / "r.jsonl", sinks=[TensorBoardSink(tmp_path / "tb")]) as w:
        run = w.with_identity(run_id="r1", seed=0)
        run.write("step", step=5, loss=0.5, done=True, name="x", per_layer=[1.0])
        run.write("final", steps=9, test_accuracy=0.75)
    acc = EventAccumulator(str(tmp_path / "tb" / "r1"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["final/steps", "final/test_accuracy", "step/loss"]
    assert [(e.step, e.value) for e in acc.Scalars("step/loss")] == [(5, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("final/test_accuracy")] == [(9, 0.75)]
