"""``--log tensorboard`` mirrors the records as scalars; ``to_dataframe`` for analysis."""

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from chimera.bench.records import IDENTITY_COLUMNS, to_dataframe
from chimera.bench.suite.execute import run_sweep
from chimera.bench.workers import execution
from chimera.cli import main
from chimera.run.records import read_records

SUITE = """
name = "tiny"
task = "digits"
model = "mlp"
seeds = [0, 1]
epochs = 2
batch_size = 64
log_every = 10

[[optimizers]]
name = "adamw"
lr = 1e-2
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracked")
    (folder / "suite.toml").write_text(SUITE, encoding="utf-8")
    with execution(log=["tensorboard"]):
        run_sweep(folder / "suite.toml", folder / "out", workers=1, progress=False)
    return folder / "out"


def _scalars(logdir):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(records, identity):
    """tag -> [(step, value)] that the JSONL records ask for."""
    expected = {}
    for r in records:
        step = r.get("step", r.get("steps", 0))
        for k, v in r.items():
            if (k not in identity and k not in ("record_type", "time", "step")
                    and isinstance(v, int | float) and not isinstance(v, bool)):
                expected.setdefault(f"{r['record_type']}/{k}", []).append((step, v))
    return expected


def test_tensorboard_gets_every_record_as_scalars_one_run_per_run_id(swept):
    finals = read_records(swept, record_type="final")
    assert sorted(p.name for p in (swept / "tensorboard").iterdir()) == sorted(
        r["run_id"] for r in finals)
    run = finals[0]["run_id"]
    scalars = _scalars(swept / "tensorboard" / run)
    assert {"step/loss", "step/lr", "epoch/train_loss", "final/test_accuracy",
            "final/num_params"} <= set(scalars)
    assert any(tag.startswith("eval/") for tag in scalars)
    assert not {"step/seed", "step/step", "final/time", "final/run_id"} & set(scalars)
    records = read_records(swept / f"{run}.jsonl")
    expected = _expected(records, identity={"seed", "epochs", "batch_size", "eval_batch_size",
                                            "log_every", "max_batches", "eval_max_batches"})
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points]), tag
    assert scalars["final/test_accuracy"][0][0] == records[-1]["steps"]


def test_to_dataframe_one_row_per_record_identity_first(swept):
    frame = to_dataframe(swept)
    records = read_records(swept)
    assert frame.shape[0] == len(records) and frame.shape[0] > 10
    n = len(IDENTITY_COLUMNS)  # a training run's records carry every one of them
    assert list(frame.columns[:n]) == list(IDENTITY_COLUMNS) and frame.columns[n] == "file"
    assert {"test_accuracy", "loss", "time"} <= set(frame.columns)
    finals = to_dataframe(swept, record_type="final")
    assert len(finals) == 2 and set(finals["record_type"]) == {"final"}
    assert set(finals["file"]) == {f"{r}.jsonl" for r in finals["run_id"]}
    one = to_dataframe(swept / finals["file"].iloc[0])
    assert set(one["run_id"]) == {finals["run_id"].iloc[0]}


def test_train_log_tensorboard_writes_beside_the_records(tmp_path):
    out = tmp_path / "runs.jsonl"
    assert main(["train", "--task", "digits", "--model", "mlp", "--optimizer", "adamw",
                 "--epochs", "1", "--out", str(out), "--log", "tensorboard", "--quiet"]) == 0
    (final,) = read_records(out, record_type="final")
    scalars = _scalars(tmp_path / "tensorboard" / final["run_id"])
    assert scalars["final/test_accuracy"][0][1] == pytest.approx(final["test_accuracy"])


@pytest.mark.parametrize("argv_tail", [["train", "--task", "digits", "--model", "mlp",
                                        "--optimizer", "adamw"], ["sweep", "suite.toml"]])
def test_missing_tensorboard_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys,
                                                              argv_tail):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    (tmp_path / "suite.toml").write_text(SUITE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main([*argv_tail, "--out", str(tmp_path / "o"), "--log", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ('needs the tensorboard package: pip install -c constraints.txt "chimera[tracking]"'
            in err)
    assert not (tmp_path / "o").exists()


def test_missing_pandas_is_one_line(swept, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ValueError, match=r'needs the pandas package: pip install .*analysis') as e:
        to_dataframe(swept)
    assert "\n" not in str(e.value)
