import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chimera.bench.suite import execute
from chimera.bench.suite.execute import run_sweep
from chimera.bench.suite.schema import load_suite
from chimera.run.records import read_records

ROOT = Path(__file__).resolve().parents[2]

SUITE = """
name = "tiny"
task = "digits"
model = "mlp"
seeds = [0]
epochs = 8
batch_size = 32
log_every = 10
lr_schedule = "cosine"

[[optimizers]]
name = "adamw"
lr = 1e-2

[[quantizers]]
quantizer = "fp32"

[[quantizers]]
quantizer = "chimera"
quant_hparams = { warmup_steps = 20 }
controller = { target_bits = 1.32, branch = "sparse", frequency = "batch" }
"""

BASE = {"task": "digits", "model": "mlp", "optimizer": "adamw", "seeds": [0]}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write(tmp_path, text, name="suite.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_grid_expansion(tmp_path):
    specs = load_suite(write(tmp_path, SUITE)).specs
    assert [(s.quantizer, s.seed, s.epochs, s.batch_size) for s in specs] == [
        ("fp32", 0, 8, 32), ("chimera", 0, 8, 32)]
    assert specs[1].controller["target_bits"] == 1.32 and specs[0].controller is None
    assert specs[0].optimizer_hparams == {"lr": 1e-2} and specs[0].lr_schedule == "cosine"
    grid = load_suite({"tasks": ["digits", "mnist1d"], "models": ["mlp", "cnn"],
                       "optimizers": ["adamw", {"name": "sgd", "lr": 0.1, "momentum": 0.9}],
                       "quantizers": ["fp32", "strict_bitnet"], "seeds": [0, 1, 2]}).specs
    assert len(grid) == 2 * 2 * 2 * 2 * 3 == len({s.run_id for s in grid})


def test_rule_axis_expands_with_its_hyper_parameters():
    tiny = {"d_hidden": 8, "num_blocks": 1}
    specs = load_suite({**BASE, "model": "resmlp", "model_hparams": tiny, "seeds": [0, 1],
                        "rules": ["backprop", {"name": "state_bridge", "K": 2}, "dfa"]}).specs
    assert [(s.rule, s.rule_hparams, s.seed) for s in specs] == [
        ("backprop", {}, 0), ("backprop", {}, 1), ("state_bridge", {"K": 2}, 0),
        ("state_bridge", {"K": 2}, 1), ("dfa", {}, 0), ("dfa", {}, 1)]
    shared = load_suite({**BASE, "model": "resmlp", "model_hparams": tiny,
                         "rules": ["state_bridge", "credit_bridge"], "rule_hparams": {"K": 2}})
    assert [s.rule_hparams for s in shared.specs] == [{"K": 2}, {"K": 2}]
    assert load_suite(BASE).specs[0].rule == "backprop"  # no rule: backprop


SHIPPED_CONFIGS = {  # quantizers and number of runs of each file in configs/
    "cifar10_resmlp.toml": ({"fp32", "chimera"}, 6),
    "cifar10_resnet20.toml": ({"fp32", "chimera"}, 6),
    "cifar10_ablation.toml": ({"fp32", "strict_bitnet", "chimera"}, 9),
    "mnist1d_rules40.toml": ({"fp32"}, 12),
    "rules_any_model.toml": ({"fp32"}, 42),
    "cifar10_rules.toml": ({"fp32"}, 18),
}


def test_every_shipped_config_is_checked():
    assert {p.name for p in (ROOT / "configs").glob("*.toml")} == set(SHIPPED_CONFIGS)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    specs = load_suite(path).specs
    quantizers, runs = SHIPPED_CONFIGS[path.name]
    assert {s.quantizer for s in specs} == quantizers and len(specs) == runs


@pytest.mark.parametrize(("change", "message"), [
    ({"optimiser": "adamw"}, r"suite.toml: no key 'optimiser'; allowed: name, title"),
    ({"grid": [{"name": "summary.md"}]}, r"must not be one of the suite's own files"),
    ({"quantizer": "chimera", "model_hparams": {"depth": 1}},
     r"quantizer 'chimera' would convert no layer: skip \['first', 'last'\]"),
    ({"quantizers": [{"quantizer": "chimera", "alpha": 1}]},
     r"quantizers.0: no key 'alpha'; allowed: quantizer, quant_hparams, controller"),
    ({"task": "imagenet"}, "task: unknown task 'imagenet'; known:"),
    ({"model": "vit"}, "model: unknown model 'vit'"),
    ({"optimizer": "adamx"}, "optimizer: unknown optimizer 'adamx'"),
    ({"quantizer": "binary"}, "quantizer: unknown quantizer 'binary'"),
    ({"rule": "state_bridge"}, "needs a residual model .*MLP has no stem"),
    ({"rule": "hebb"}, "rule: unknown learning rule 'hebb'; known:"),
    ({"rules": ["backprop", "hebb"]}, "rules.1: unknown learning rule 'hebb'"),
    ({"rule": "backprop", "rule_hparams": {"K": 2}}, "'backprop' takes no rule_hparams"),
    ({"model": "resmlp", "rule": "dfa", "rule_hparams": {"K": 2}}, "no hyper-parameter 'K'"),
    ({"model": "resmlp", "rules": [{"name": "state_bridge", "K": 0}]}, "K must be an integer"),
    ({"precision": "fp16"}, "precision: Input should be 'fp32' or 'bf16', got 'fp16'"),
    ({"epochs": 0}, "epochs: Input should be greater than or equal to 1, got 0"),
    ({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
    ({"seeds": [0, 0]}, r"seeds: entries must be distinct, got \[0, 0\]"),
    ({"seeds": [-1]}, "seeds.0: Input should be greater than or equal to 0, got -1"),
    ({"seeds": "0"}, "seeds: Input should be a valid list, got '0'"),
    ({"lr_schedule": "step"}, "lr_schedule: Input should be 'constant' or 'cosine'"),
    ({"optimizer_hparams": {"lr": 1e-3, "gamma": 2}}, "gamma"),
    ({"optimizer_hparams": {"lr": -1.0}}, r"lr must be a number >= 0, got -1.0"),
    ({"model_hparams": {"width": 3}},
     r"model_hparams: model 'mlp' has no argument 'width'; allowed: hidden: int"),
    ({"quantizer": "fp32", "controller": {"target_bits": 1.32}}, "BitLinear"),
    ({"quantizer": "int_ternary"}, "scaled_optum"),
    ({"task": None, "tasks": []}, "tasks: List should have at least 1 item"),
    ({"task": None}, "exactly one of 'task' and 'tasks'"),
])
def test_rejections_raise_before_any_run(change, message, tmp_path, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(execute, "_run_one", no_run)
    suite = {**BASE, **change}
    lines = [f"{k} = {_toml(v)}" for k, v in suite.items() if v is not None]
    path = write(tmp_path, "\n".join(lines))
    with pytest.raises(ValueError, match=message) as error:
        run_sweep(path, tmp_path / "out", workers=1, progress=False)
    assert str(error.value).startswith(f"{path}") and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# new rejections of the typed schema: each names its key, in one line
@pytest.mark.parametrize(("change", "message"), [
    ({"epochs": "3"}, "^suite.toml: epochs: Input should be a valid integer, got '3'$"),
    ({"resources": {"num_cpus": 0}},
     "^suite.toml: resources.num_cpus: Input should be greater than 0, got 0$"),
    ({"resources": {"num_gpus": -0.5}},
     "^suite.toml: resources.num_gpus: Input should be greater than or equal to 0, got -0.5$"),
    ({"resources": {"cpus": 1}}, "^suite.toml: resources: no key 'cpus'; allowed: num_cpus, "
                                 "num_gpus$"),
    ({"epochs": 3.0}, "^suite.toml: epochs: Input should be a valid integer, got 3.0$"),
    ({"log_every": True}, "^suite.toml: log_every: Input should be a valid integer, got True$"),
    ({"task": 1}, "^suite.toml: task: Input should be a valid string, got 1$"),
    ({"title": ["a"]}, "^suite.toml: title: Input should be a valid string$"),
    ({"seeds": [0, 1, 0]}, r"^suite.toml: seeds: entries must be distinct, got \[0, 1, 0\]$"),
    ({"seeds": []}, "^suite.toml: seeds: List should have at least 1 item after validation"),
    ({"seeds": [0.0]}, "^suite.toml: seeds.0: Input should be a valid integer, got 0.0$"),
    ({"task": None, "tasks": ["digits", "digits"]}, "^suite.toml: tasks: entries must be distinct"),
    ({"model": None, "models": []}, "^suite.toml: models: List should have at least 1 item"),
    ({"optimizer": None, "optimizers": []}, "^suite.toml: optimizers: List should have at least"),
    ({"quantizers": []}, "^suite.toml: quantizers: List should have at least 1 item"),
    ({"rules": []}, "^suite.toml: rules: List should have at least 1 item"),
    ({"device": "tpu"},
     "^suite.toml: device: device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'$"),
    ({"device": "cuda:x"}, "^suite.toml: device: device must be 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "cpu:0"}, "^suite.toml: device: device must be 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "mps"}, "^suite.toml: device: device must be 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": 0}, "^suite.toml: device: Input should be a valid string, got 0$"),
    ({"model_hparams": {"hidden": "3"}},
     "^suite.toml: model_hparams: hidden of model 'mlp': Input should be a valid integer, got '3' "
     r"\(allowed: hidden: int, depth: int\)$"),
    ({"model_hparams": {"depth": 1.5}},
     "^suite.toml: model_hparams: depth of model 'mlp': Input should be a valid integer, got 1.5"),
    ({"model": None, "models": ["mlp", "cnn"], "model_hparams": {"hidden": 8}},
     r"^suite.toml: model_hparams: model 'cnn' has no argument 'hidden'; allowed: "
     "channels: int$"),
    ({"model": "resnet20", "model_hparams": {"width": 2}},
     r"model_hparams: model 'resnet20' has no argument 'width'; allowed: none$"),
    ({"optimizer_hparams": {"lr": float("inf")}},
     "^suite.toml: optimizer_hparams: lr must be a finite number, got inf$"),
    ({"optimizer": None, "optimizers": [{"name": "sgd", "lr": float("nan")}]},
     "^suite.toml: optimizers.0: lr must be a finite number, got nan$"),
    ({"quantizer": "chimera", "controller": {"target_bits": float("inf")}},
     "^suite.toml: controller: target_bits must be a finite number, got inf$"),
    ({"optimizer": None, "optimizers": [{"lr": 1e-3}]}, "^suite.toml: optimizers.0.name: Field "
                                                        "required$"),
    ({"optimizer": None, "optimizers": [3]},
     "^suite.toml: optimizers.0: must be a name or a table {name, <hyper-parameters>}$"),
    ({"quantizers": [{"quant_hparams": {}}]},
     "^suite.toml: quantizers.0.quantizer: Field required$"),
    ({"quantizers": ["fp32", {"quantizer": "chimera", "controller": 3}]},
     "^suite.toml: quantizers.1.controller: Input should be a table, got 3$"),
    ({"quantizer": "chimera", "quant_hparams": {"warmup_steps": "x"}},
     "^suite.toml: quant_hparams: warmup_steps must be an integer"),
    ({"optimizer_hparams": 0.1},
     "^suite.toml: optimizer_hparams: Input should be a table, got 0.1$"),
    ({"stress": 3}, r"^suite.toml \[stress\]: Input should be a table, got 3$"),
])
def test_typed_schema_rejections_name_the_key(change, message):
    suite = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message) as error:
        load_suite(suite, "suite.toml")
    assert "\n" not in str(error.value)


def test_model_hparams_of_the_right_types_pass():
    spec = load_suite({**BASE, "model": "resmlp", "device": "cpu",
                       "model_hparams": {"d_hidden": 8, "num_blocks": 1}}).specs[0]
    assert spec.model_hparams == {"d_hidden": 8, "num_blocks": 1}
    cuda = load_suite({**BASE, "device": "cuda:1"}).specs[0]  # validated, not run
    assert cuda.device == "cuda:1"


def _toml(value):
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not valid TOML"):
        load_suite(write(tmp_path, "task = "))
    with pytest.raises(ValueError, match="suite file not found"):
        load_suite(tmp_path / "nope.toml")


def _sweep_cmd(suite, out):
    return [sys.executable, "-m", "chimera", "sweep", str(suite), "--out", str(out),
            "--workers", "1", "--quiet"]


def _kill_mid_run(suite, out, timeout=60.0):
    """Start the sweep, SIGKILL it once some epoch records exist but not every final."""
    proc = subprocess.Popen(_sweep_cmd(suite, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(out.glob("*.jsonl"))
            epochs = sum(f.read_bytes().count(b'"record_type": "epoch"') for f in files)
            if epochs >= 3:
                break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path, one_thread):
    suite = write(tmp_path, SUITE)
    out = tmp_path / "killed"
    _kill_mid_run(suite, out)
    finals = read_records(out, record_type="final")
    assert len(finals) < 2, "the sweep finished before it was killed"
    assert any(read_records(f, record_type="epoch") for f in out.glob("*.jsonl"))

    done = subprocess.run(_sweep_cmd(suite, out), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "chimera" in done.stdout and (out / "summary.md").exists()

    run_sweep(suite, tmp_path / "ref", workers=1, progress=False)
    recs = read_records(out)
    keys = [(r["run_id"], r["record_type"], r.get("epoch"), r.get("step")) for r in recs]
    assert len(keys) == len(set(keys))  # no duplicated record
    assert all(path.read_bytes().endswith(b"\n") for path in out.glob("*.jsonl"))
    ref = read_records(tmp_path / "ref")
    assert sorted(keys) == sorted((r["run_id"], r["record_type"], r.get("epoch"), r.get("step"))
                                  for r in ref)
    metrics = ("test_accuracy", "test_loss", "val_accuracy", "best_val_accuracy", "steps",
               "quant_global_zero_ratio", "controller_alpha")

    def by_run(records):
        return {r["run_id"]: tuple(r.get(k) for k in metrics)
                for r in records if r["record_type"] == "final"}

    assert len(by_run(recs)) == 2 and by_run(recs) == by_run(ref)

    # a third run skips everything: the record files are left as they are
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    run_sweep(suite, out, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
