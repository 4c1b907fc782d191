"""``--executor ray``: the same records as the local pool, and a driver killed mid-run resumes.

One local Ray instance of 2 CPUs serves the whole module; the killed driver joins it by its
address (the ``--address`` path of a cluster)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from chimera.bench.ray_executor import RayExecutor, _InRoot, _relative, import_ray
from chimera.bench.suite.execute import run_sweep
from chimera.bench.workers import Resources, execution
from chimera.cli import main
from chimera.run.records import read_records

SUITE = """
name = "tiny"
task = "digits"
model = "mlp"
seeds = [0, 1]
epochs = 4
batch_size = 32
log_every = 10

[[optimizers]]
name = "adamw"
lr = 1e-2
"""


def _measured(records):
    """The records without what depends on the clock (times, durations, throughput)."""
    clock = ("time", "throughput")
    return sorted(tuple(sorted((k, repr(v)) for k, v in r.items()
                               if not k.endswith("_s") and not any(c in k for c in clock)))
                  for r in records)


@pytest.fixture(scope="module")
def ray_address():
    ray = import_ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _suite(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_text(SUITE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The suite's folder written by the local pool."""
    folder = tmp_path_factory.mktemp("pool")
    run_sweep(_suite(folder), folder / "out", workers=2, progress=False)
    return folder / "out"


def _names(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_ray_gives_the_records_of_the_local_pool(tmp_path, ray_address, pool):
    with execution(RayExecutor()):
        summary = run_sweep(_suite(tmp_path), tmp_path / "ray", progress=False)
    assert "adamw" in summary and (tmp_path / "ray" / "summary.md").read_text() == summary
    assert _names(tmp_path / "ray") == _names(pool)  # checkpoints/ included, no temporaries
    records = read_records(pool)
    assert len(records) > 10 and _measured(read_records(tmp_path / "ray")) == _measured(records)


def _sweep_cmd(suite, out, address):
    return [sys.executable, "-m", "chimera", "sweep", str(suite), "--out", str(out), "--quiet",
            "--executor", "ray", "--address", address]


def test_a_killed_ray_driver_resumes_to_the_same_records(tmp_path, ray_address, pool):
    suite, out = _suite(tmp_path), tmp_path / "killed"
    proc = subprocess.Popen(_sweep_cmd(suite, out, ray_address), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300  # generous: a loaded CI machine starts Ray slowly
    try:  # kill it once a checkpoint came back, before every run is final
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob("checkpoints/*.pt")):
                break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(read_records(out, record_type="final")) < 2, "finished before it was killed"
    assert list(out.glob("checkpoints/*.pt")), "killed before any checkpoint came back"

    done = subprocess.run(_sweep_cmd(suite, out, ray_address), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert _measured(read_records(out)) == _measured(read_records(pool))
    assert _names(out) == _names(pool)


def test_suite_resources_size_the_tasks_unless_the_cli_sets_them(ray_address):
    """A task gets the suite's ``[resources]`` (its torch threads follow its CPUs); the
    ``--cpus-per-run`` value wins over the suite's; without either, one CPU."""
    calls = [(torch.get_num_threads, ())]
    assert RayExecutor()(calls, False, "t", None, Resources(num_cpus=2)) == [2]
    assert RayExecutor(cpus_per_run=1)(calls, False, "t", None, Resources(num_cpus=2)) == [1]
    assert RayExecutor()(calls, False, "t", None) == [1]


def test_cli_rejects_ray_options_without_ray(tmp_path, capsys):
    assert main(["sweep", str(_suite(tmp_path)), "--out", str(tmp_path / "o"),
                 "--address", "auto"]) == 2
    assert "--address must be given only with --executor ray" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--cpus-per-run must be a number > 0"):
        RayExecutor(cpus_per_run=0)


def test_missing_ray_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["sweep", str(_suite(tmp_path)), "--out", str(tmp_path / "o"),
                 "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'needs the ray package: pip install' in err
    assert not (tmp_path / "o").exists()


def test_only_absolute_paths_inside_the_folder_are_mapped(tmp_path, monkeypatch):
    """With the output folder as the working directory (``--out .``), a sink's name still
    reaches the task as a name, not as a path into its scratch folder."""
    monkeypatch.chdir(tmp_path)
    records, outside = str(tmp_path / "g" / "r.jsonl"), str(tmp_path.parent / "x")
    args = (records, "tensorboard", outside, (("tensorboard", str(tmp_path / "tensorboard")),))
    assert _relative(args, tmp_path) == (
        _InRoot("g/r.jsonl"), "tensorboard", outside, (("tensorboard", _InRoot("tensorboard")),))
