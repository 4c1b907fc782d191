from chimera.bench.main import MNIST1D_GRID, run_bench
from chimera.bench.records import read_records
from chimera.bench.stress import STRESS_CONFIGS
from chimera.data.stress import STRESS


def test_bench_smoke_writes_records_and_summary(tmp_path):
    summary = run_bench(tmp_path, seeds=(0,), stress_steps=12, epochs=1, progress=False)
    stress = read_records(tmp_path / "stress.jsonl", record_type="final")
    assert len(stress) == len(STRESS.names()) * len(STRESS_CONFIGS.names())
    finals = read_records(tmp_path / "mnist1d.jsonl", record_type="final")
    assert len(finals) == len(MNIST1D_GRID)
    assert (tmp_path / "summary.md").read_text() == summary
    for name in ("chimera21-zero-inertia", "noisy_quadratic", "| mnist1d | cnn", "stac", "94"):
        assert name in summary
    # a second run rewrites its record files instead of appending duplicates
    run_bench(tmp_path, seeds=(0,), stress_steps=12, epochs=1, progress=False)
    assert len(read_records(tmp_path / "mnist1d.jsonl", record_type="final")) == len(finals)
