from chimera.bench.main import MNIST1D_GRID, QUANT_MODES, run_bench
from chimera.bench.pool import run_specs
from chimera.bench.records import read_records
from chimera.bench.spec import RunSpec
from chimera.bench.stress import STRESS_CONFIGS
from chimera.data.stress import STRESS


def test_bench_smoke_writes_records_and_summary(tmp_path):
    summary = run_bench(tmp_path, seeds=(0,), stress_steps=12, epochs=1, quant_epochs=1,
                        rule_epochs=1, workers=1, progress=False)
    stress = read_records(tmp_path / "stress.jsonl", record_type="final")
    assert len(stress) == len(STRESS.names()) * len(STRESS_CONFIGS.names())
    assert len(read_records(tmp_path / "mnist1d", record_type="final")) == len(MNIST1D_GRID)
    quant = read_records(tmp_path / "quant", record_type="final")
    assert sorted(r["quantizer"] for r in quant) == sorted(QUANT_MODES)
    rules = read_records(tmp_path / "rules", record_type="final")
    assert sorted(r["rule"] for r in rules) == ["backprop", "credit_bridge", "dfa", "state_bridge"]
    assert all("credit_costate_cosine" in r for r in rules if r["rule"] != "backprop")
    assert (tmp_path / "summary.md").read_text() == summary
    assert (tmp_path / "report.md").exists() and (tmp_path / "learning_curves.png").exists()
    for name in ("chimera21-zero-inertia", "noisy_quadratic", "| mnist1d | cnn", "stac", "94",
                 "int_ternary", "scaled_optum", "state_bridge", "1 (exact)"):
        assert name in summary
    # a second run rewrites its record files instead of appending duplicates
    run_bench(tmp_path, seeds=(0,), stress_steps=12, epochs=1, quant_epochs=1, rule_epochs=1,
              workers=1, progress=False)
    assert len(read_records(tmp_path / "mnist1d", record_type="final")) == len(MNIST1D_GRID)
    assert len(read_records(tmp_path / "stress.jsonl", record_type="final")) == len(stress)


def test_worker_pool_gives_the_same_results_as_one_process(tmp_path):
    specs = [RunSpec("digits", "mlp", "adamw", seed=s, epochs=1, batch_size=64,
                     optimizer_hparams={"lr": 1e-2}) for s in (0, 1)]
    serial = run_specs(specs, tmp_path / "a", workers=1, progress=False)
    pooled = run_specs(specs, tmp_path / "b", workers=2, progress=False)
    assert [r["test_loss"] for r in serial] == [r["test_loss"] for r in pooled]
    assert [r["seed"] for r in pooled] == [0, 1]
    assert len(list((tmp_path / "b").glob("*.jsonl"))) == 2
