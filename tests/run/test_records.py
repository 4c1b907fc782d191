import json
import math

import pytest
import torch

from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec


def test_writer_flushes_each_record_and_reader_round_trips(tmp_path):
    path = tmp_path / "r.jsonl"
    w = RecordWriter(path, identity={"run_id": "a"})
    w.write("step", step=1, loss=torch.tensor(0.5))
    # flushed: readable before close
    recs = read_records(path)
    assert recs == [{"run_id": "a", "record_type": "step", "step": 1, "loss": 0.5}]
    w.with_identity(seed=3).write("final", loss=float("nan"), acc=math.inf)
    w.close()
    recs = read_records(path)
    assert recs[1] == {"run_id": "a", "seed": 3, "record_type": "final", "loss": None,
                       "acc": None}
    assert read_records(path, record_type="final") == [recs[1]]


def test_unknown_record_type_rejected(tmp_path):
    with RecordWriter(tmp_path / "r.jsonl") as w, pytest.raises(ValueError, match="record_type"):
        w.write("bogus")


def test_partial_tail_is_ignored_by_reader_and_cut_by_writer(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"record_type": "step", "step": 1}) + '\n{"record_type": "st')
    assert read_records(path) == [{"record_type": "step", "step": 1}]
    with RecordWriter(path) as w:
        w.write("step", step=2)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_broken_middle_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2"):
        read_records(path)


def test_reader_reads_a_directory_and_reports_missing_files(tmp_path):
    for name in ("a", "b"):
        with RecordWriter(tmp_path / f"{name}.jsonl") as w:
            w.write("final", name=name)
    assert [r["name"] for r in read_records(tmp_path)] == ["a", "b"]
    with pytest.raises(ValueError, match="not found"):
        read_records(tmp_path / "missing.jsonl")


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
