import os
import threading

import pytest

from chimera.bench.jobs.bench import bench_suite, run_bench
from chimera.bench.jobs.stress import STRESS_CONFIGS
from chimera.bench.lock import folder_lock, read_holder
from chimera.bench.suite.execute import spec_call
from chimera.bench.suite.schema import load_suite
from chimera.bench.workers import run_calls
from chimera.cli import main
from chimera.data.stress_problems import STRESS
from chimera.run.records import read_records
from chimera.run.spec import RunSpec


def test_bench_smoke_writes_records_summary_and_report(tmp_path):
    summary = run_bench(tmp_path, seeds=(0,), stress_steps=12, epochs=1, quant_epochs=1,
                        rule_epochs=1, toy_lq_steps=2, workers=1, progress=False)
    stress = read_records(tmp_path / "stress.jsonl", record_type="final")
    assert len(stress) == len(STRESS.names()) * len(STRESS_CONFIGS.names())
    assert {r["steps"] for r in stress} == {12}
    suite = load_suite(bench_suite())
    for grid in suite.grids:  # one record file per run of one seed, in the grid's folder
        finals = read_records(tmp_path / grid.name, record_type="final")
        assert len(finals) == len({s.config_id for s in grid.specs})
        assert {r["epochs"] for r in finals} == {1} and {r["seed"] for r in finals} == {0}
    quant = read_records(tmp_path / "quant", record_type="final")
    assert sorted(r["quantizer"] for r in quant) == [
        "chimera", "fp32", "int_ternary", "strict_bitnet"]
    rules = read_records(tmp_path / "rules", record_type="final")
    assert sorted(r["rule"] for r in rules) == ["backprop", "credit_bridge", "dfa", "state_bridge"]
    assert all("credit_costate_cosine" in r for r in rules if r["rule"] != "backprop")
    for grid in suite.grids:  # the protocol: validation per epoch, test only in the final
        for r in read_records(tmp_path / grid.name):
            assert not any(k.startswith("best_test") for k in r), r["run_id"]
            if r["record_type"] == "eval":
                assert 0 <= r["val_accuracy"] <= 1 and "test_accuracy" not in r
            if r["record_type"] == "final":
                assert {"val_accuracy", "val_loss", "test_accuracy", "test_loss",
                        "best_val_accuracy", "best_val_epoch"} <= r.keys()
    toy = read_records(tmp_path / "toy_lq.jsonl", record_type="final")
    assert sorted(r["variant"] for r in toy) == sorted(suite.toy_lq.rules)
    assert (tmp_path / "summary.md").read_text() == summary
    assert (tmp_path / "report.md").exists() and (tmp_path / "learning_curves.png").exists()
    for name in ("## Stress problems (12 steps, seeds [0])", "chimera21-zero-inertia",
                 "## Digits", "| digits | mlp", "## MNIST-1D optimizers", "| mnist1d | cnn",
                 "stac", "94", "## MNIST-1D quantizers", "int_ternary", "scaled_optum",
                 "## MNIST-1D learning rules", "state_bridge", "1 (exact)", "val acc (%)",
                 "## Toy LQ credit quality (2 steps, seeds [0])",
                 "credit_bridge_tgw0"):
        assert name in summary


def test_bench_command_runs_another_suite(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text('task = "digits"\nmodel = "mlp"\noptimizer = "adamw"\nepochs = 3\n'
                     "seeds = [0, 1]\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["bench", "--suite", str(suite), "--out", str(out), "--seeds", "1",
                 "--epochs", "1", "--workers", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    finals = read_records(out, record_type="final")
    assert [(r["seed"], r["epochs"]) for r in finals] == [(0, 1)]  # the overrides applied
    assert "| digits | mlp" in printed
    assert printed.rstrip().splitlines()[-1] == f"report: {out / 'report.md'}"
    assert (out / "report.md").exists()


def test_worker_pool_gives_the_same_results_as_one_process(tmp_path):
    specs = [RunSpec("digits", "mlp", "adamw", seed=s, epochs=1, batch_size=64,
                     optimizer_hparams={"lr": 1e-2}) for s in (0, 1)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    serial = run_calls([spec_call(s, tmp_path / "a") for s in specs], workers=1, progress=False)
    pooled = run_calls([spec_call(s, tmp_path / "b") for s in specs], workers=2, progress=False)
    assert [r["test_loss"] for r in serial] == [r["test_loss"] for r in pooled]
    assert [r["seed"] for r in pooled] == [0, 1]
    assert len(list((tmp_path / "b").glob("*.jsonl"))) == 2


def test_bench_refuses_a_locked_folder_or_waits_for_it(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text('task = "digits"\nmodel = "mlp"\noptimizer = "adamw"\nepochs = 1\n'
                     "seeds = [0]\n", encoding="utf-8")
    out, held, release = tmp_path / "out", threading.Event(), threading.Event()

    def hold():  # another writer of the folder (a thread here: it has its own lock handle)
        with folder_lock(out):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    try:
        with pytest.raises(ValueError, match=f"^out: the folder {out} is in use by pid "
                                             f"{os.getpid()} .*pass --wait"):
            run_bench(out, suite=suite, workers=1, progress=False)
        assert not (out / "summary.md").exists() and not list(out.glob("*.jsonl"))
        threading.Timer(0.5, release.set).start()
        run_bench(out, suite=suite, workers=1, progress=False, wait=True)
    finally:
        release.set()
        holder.join()
    assert f"waiting for {out}" in capsys.readouterr().err
    assert len(read_records(out, record_type="final")) == 1 and (out / "report.md").exists()
    assert read_holder(out) is None
