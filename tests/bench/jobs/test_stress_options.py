"""The original stress script's knobs (sizes, noise, sparsity, learning rates, timing warm-up)
through ``StressOptions``, ``chimera stress`` and ``[stress]`` suites; diagnostics in the step
records."""

import pytest

from chimera.bench.jobs.stress import (
    DEFAULT_OPTIONS,
    StressOptions,
    run_stress_one,
    stress_config_id,
)
from chimera.bench.suite.schema import load_suite
from chimera.cli import main
from chimera.run.records import RecordWriter, read_records

ORIGINAL = StressOptions(batch_size=64, in_features=10, hidden_features=8, noise_scale=2.0,
                         sparsity=0.7, lr=1e-3, timing_warmup_steps=0, diag_every=1)


def test_options_reach_the_problem_and_the_optimizer(tmp_path):
    with RecordWriter(tmp_path / "s.jsonl") as w:
        final = run_stress_one("sparse_relu", "chimera21", 0, 6, w, ORIGINAL)
    assert final["optimizer_hparams"]["lr"] == 1e-3  # the configuration's own is 3e-3
    assert final["stress_options"]["in_features"] == 10
    steps = read_records(tmp_path / "s.jsonl", "step")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]  # diag_every=1: every step
    assert all(s["opt_collision_score"] is not None and "opt_mean_kappa" in s for s in steps)
    assert final["collision_score"] is not None and final["median_step_time_s"] is not None
    default = run_stress_one("sparse_relu", "chimera21", 0, 6)
    assert default["final_loss"] != final["final_loss"]
    assert default["config_id"] == "sparse_relu-chimera21"  # default options keep the old ids
    assert final["config_id"].startswith("sparse_relu-chimera21-")


def test_per_problem_lr_and_ids():
    per = StressOptions(lr={"saddle": 1e-2})
    assert per.lr_for("saddle") == 1e-2 and per.lr_for("regression") is None
    assert stress_config_id("saddle", "adam", per) != stress_config_id("saddle", "adam")
    timing_only = StressOptions(timing_warmup_steps=0, diag_every=1)
    assert stress_config_id("saddle", "adam", timing_only) == "saddle-adam"
    assert StressOptions() == DEFAULT_OPTIONS


@pytest.mark.parametrize(("fields", "message"), [
    ({"batch_size": 0}, "batch_size"), ({"sparsity": 1.0}, "sparsity"),
    ({"noise_scale": -1.0}, "noise_scale"), ({"lr": 0.0}, "lr must be a number > 0"),
    ({"lr": {"bogus": 1e-3}}, "lr problem must be a stress problem"),
    ({"timing_warmup_steps": -1}, "timing_warmup_steps"), ({"diag_every": 0}, "diag_every"),
])
def test_bad_options_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        StressOptions(**fields)


def test_stress_suite_table_and_cli_take_the_options(tmp_path, capsys):
    suite = load_suite({"stress": {"steps": 4, "problems": ["regression"], "configs": ["adam"],
                                   "noise_scale": 2.0, "sparsity": 0.7, "in_features": 10,
                                   "hidden_features": 8, "lr": {"regression": 1e-3},
                                   "timing_warmup_steps": 0, "diag_every": 2}})
    assert suite.stress.options == StressOptions(
        in_features=10, hidden_features=8, noise_scale=2.0, sparsity=0.7,
        lr={"regression": 1e-3}, timing_warmup_steps=0, diag_every=2)
    with pytest.raises(ValueError, match=r"\[stress\].*diag_every"):
        load_suite({"stress": {"steps": 4, "diag_every": 0}})
    out = tmp_path / "s.jsonl"
    assert main(["stress", "--problems", "regression", "--optimizers", "adam", "--seeds", "1",
                 "--steps", "4", "--in-features", "10", "--noise-scale", "2", "--lr", "5e-4",
                 "--diag-every", "2", "--out", str(out), "--quiet"]) == 0
    final = read_records(out, "final")[0]
    assert final["optimizer_hparams"]["lr"] == 5e-4
    assert final["stress_options"]["in_features"] == 10
    assert final["stress_options"]["noise_scale"] == 2.0
    assert [r["step"] for r in read_records(out, "step")] == [2, 4]
    assert main(["stress", "--lr", "regression=1e-3", "--lr", "saddle=0", "--out",
                 str(tmp_path / "x.jsonl")]) == 2
    assert "lr.saddle must be a number > 0" in capsys.readouterr().err
