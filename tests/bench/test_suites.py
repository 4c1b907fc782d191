"""Multi-grid suites: [[grid]] sections, [stress] and [toy_lq], the packaged bench suite."""

import dataclasses
import hashlib
import tomllib
from pathlib import Path

import pytest
import torch

from chimera.bench.jobs.bench import bench_suite, override_suite
from chimera.bench.jobs.compare_quant import quant_specs
from chimera.bench.jobs.toy_lq import DEFAULT_VARIANTS
from chimera.bench.report.write import write_report
from chimera.bench.suite import execute
from chimera.bench.suite.execute import run_suite, run_sweep
from chimera.bench.suite.schema import load_suite
from chimera.run.records import read_records

TINY_RESMLP = {"d_hidden": 8, "num_blocks": 1}

MULTI = """
name = "multi"
task = "digits"
model = "mlp"
optimizer = "adamw"
optimizer_hparams = { lr = 1e-2 }
seeds = [0]
epochs = 1
batch_size = 256

[stress]
problems = ["regression"]
configs = ["sgd", "adamw"]
steps = 12

[toy_lq]
rules = ["dfa"]
steps = 3

[[grid]]
name = "opt"
title = "Optimizers"
optimizers = [{ name = "adamw", lr = 1e-2 }, { name = "sgd", lr = 0.1 }]

[[grid]]
name = "opt"
model = "resmlp"
model_hparams = { d_hidden = 8, num_blocks = 1 }
epochs = 2

[[grid]]
name = "rules"
model = "resmlp"
model_hparams = { d_hidden = 8, num_blocks = 1 }
rules = ["backprop", "dfa"]
"""

# config ids of today's bench (README tables); moving the grids into bench.toml kept them
BENCH_CONFIG_IDS = {
    "mnist1d": ["mnist1d-cnn-adamw-7c70f96b", "mnist1d-cnn-chimera21-0ee3f669",
                "mnist1d-cnn-stac-25c71691", "mnist1d-cnn-lion-5b1a2cee",
                "mnist1d-cnn-sgd-7ee1753f", "mnist1d-mlp-adamw-dccec14d"],
    "quant": ["mnist1d-cnn-adamw-ed849782", "mnist1d-cnn-adamw-bf5603e1",
              "mnist1d-cnn-adamw-875b3560", "mnist1d-cnn-scaled_optum-9eb1e1b0"],
    "rules": ["mnist1d-resmlp-adamw-2d2df03b", "mnist1d-resmlp-adamw-6b707d7c",
              "mnist1d-resmlp-adamw-c16e4e6c", "mnist1d-resmlp-adamw-831192e8"],
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def suite_file(tmp_path, text=MULTI):
    path = tmp_path / "suite.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_packaged_bench_suite_validates_and_keeps_the_bench_runs():
    suite = load_suite(bench_suite())
    grids = {g.name: g for g in suite.grids}
    assert list(grids) == ["digits", "mnist1d", "quant", "rules"]
    for name, ids in BENCH_CONFIG_IDS.items():
        specs = grids[name].specs
        assert list(dict.fromkeys(s.config_id for s in specs)) == ids
        assert {s.seed for s in specs} == {0, 1, 2}
    # compare-quant's recipes are the quantizer grid
    assert list(grids["quant"].specs) == quant_specs(
        ["fp32", "strict_bitnet", "chimera", "int_ternary"], [0, 1, 2])
    short = quant_specs(["chimera"], [4], task="digits", model="mlp", epochs=2)
    assert [(s.task, s.model, s.epochs, s.seed, s.controller) for s in short] == [
        ("digits", "mlp", 2, 4, grids["quant"].specs[6].controller)]
    assert {s.task for s in grids["digits"].specs} == {"digits"}
    assert suite.stress.steps == 300 and len(suite.stress.problems) == 4
    assert suite.toy_lq.rules == DEFAULT_VARIANTS and suite.toy_lq.seeds == (0, 1, 2)


def test_bench_suite_keeps_the_run_ids_of_the_hand_written_validator():
    """Run ids computed by the validator before the typed schema (same specs, same ids)."""
    ids = [s.run_id for s in load_suite(bench_suite()).specs]
    assert len(ids) == 45
    assert hashlib.sha1("\n".join(ids).encode()).hexdigest() == (
        "c7cf9fded3de54c0449e85625891f590790495e3")
    assert {"digits-mlp-adamw-4459a905-s0", "mnist1d-cnn-adamw-7c70f96b-s1",
            "mnist1d-mlp-adamw-dccec14d-s2", "mnist1d-cnn-scaled_optum-9eb1e1b0-s2",
            "mnist1d-resmlp-adamw-831192e8-s0"} <= set(ids)
    configs = Path(__file__).resolve().parents[2] / "configs"
    assert load_suite(configs / "cifar10_resnet20.toml").specs[0].run_id == (
        "cifar10-resnet20-adamw-c9cf4a4f-s0")


def test_grids_inherit_top_level_groups_and_share_sections_by_name(tmp_path):
    suite = load_suite(suite_file(tmp_path))
    assert [(g.name, g.title) for g in suite.grids] == [("opt", "Optimizers"), ("rules", "rules")]
    opt, rules = suite.grids
    assert [(s.model, s.optimizer, s.optimizer_hparams, s.epochs) for s in opt.specs] == [
        ("mlp", "adamw", {"lr": 1e-2}, 1), ("mlp", "sgd", {"lr": 0.1}, 1),
        ("resmlp", "adamw", {"lr": 1e-2}, 2)]
    assert [(s.rule, s.model_hparams, s.batch_size) for s in rules.specs] == [
        ("backprop", TINY_RESMLP, 256), ("dfa", TINY_RESMLP, 256)]
    assert opt.heading() == "Optimizers (1/2 epochs, batch 256, constant lr, seeds [0])"
    assert suite.stress.configs == ("sgd", "adamw") and suite.toy_lq.seeds == (0,)


@pytest.mark.parametrize(("old", "new", "message"), [
    ('name = "opt"\ntitle', "title", r"\[\[grid\]\] #1: name: Field required$"),
    ('name = "opt"\ntitle', 'name = "o pt"\ntitle', r"\[\[grid\]\] #1 'o pt': name: a \[\[grid\]\] "
     r"name starts with a letter or digit, then letters, digits, '_', '.', '-'"),
    ('name = "rules"\nmodel = "resmlp"', 'name = "rules"\nmodels = []',
     r"\[\[grid\]\] #3 'rules': models: List should have at least 1 item"),
    ('name = "opt"\nmodel =', 'name = "opt"\nmodle =',
     r"\]\] #2 'opt': no key 'modle'; allowed"),
    ("epochs = 2", 'epochs = "2"',
     r"\]\] #2 'opt': epochs: Input should be a valid integer, got '2'"),
    ("epochs = 2", 'device = "gpu"', r"\]\] #2 'opt': device: device must be 'cpu', 'cuda' or"),
    ("d_hidden = 8, num_blocks = 1 }\nepochs", "d_hidden = 8.0, num_blocks = 1 }\nepochs",
     r"\]\] #2 'opt': model_hparams: d_hidden of model 'resmlp': Input should be a valid integer"),
    ("[stress]", "[stress]\nseeds = [1, 1]", r"\[stress\]: seeds: entries must be distinct"),
    ('configs = ["sgd", "adamw"]', "configs = []", r"\[stress\]: configs: List should have at"),
    ('"rules"\nmodel = "resmlp"\nmodel_hparams = { d_hidden = 8, num_blocks = 1 }\n'
     'rules = ["backprop", "dfa"]', '"rules"\nrules = ["backprop", "state_bridge"]',
     "#3 'rules': run digits-mlp-adamw-.*-s0: a learning rule needs a residual model"),
    ('"regression"]', '"ridge"]', r"\[stress\]: problems.0: unknown stress problem 'ridge'"),
    ('rules = ["dfa"]', 'rules = ["hebb"]', r"\[toy_lq\]: rules.0: unknown toy LQ variant"),
    ("steps = 3", "steps = 0", r"\[toy_lq\]: steps: Input should be greater than or equal to 1"),
    ("[toy_lq]", "[toy_lq]\nsteps_ = 1", r"\[toy_lq\]: no key 'steps_'; allowed"),
])
def test_multi_grid_rejections_name_the_section(old, new, message, tmp_path, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(execute, "_run_one", no_run)
    assert old in MULTI
    path = suite_file(tmp_path, MULTI.replace(old, new, 1))
    with pytest.raises(ValueError, match=message) as error:
        run_sweep(path, tmp_path / "out", workers=1, progress=False)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_conflicting_titles_and_files_without_grids():
    data = tomllib.loads(MULTI)
    data["grid"][1]["title"] = "Other"
    with pytest.raises(ValueError, match="grids named 'opt' have different titles"):
        load_suite(data)
    only = load_suite({"seeds": [0, 1], "stress": {"steps": 5}})
    assert only.grids == () and only.stress.seeds == (0, 1) and only.toy_lq is None


def test_multi_grid_suite_runs_end_to_end_and_resumes(tmp_path, one_thread):
    path, out = suite_file(tmp_path), tmp_path / "out"
    summary = run_sweep(path, out, workers=1, progress=False)
    assert (out / "summary.md").read_text(encoding="utf-8") == summary
    headings = [line for line in summary.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Stress problems (12 steps, seeds [0])",
        "## Optimizers (1/2 epochs, batch 256, constant lr, seeds [0])",
        "## rules (1 epoch, batch 256, constant lr, seeds [0])",
        "## Toy LQ credit quality (3 steps, seeds [0])"]
    assert len(read_records(out / "opt", record_type="final")) == 3
    rules = read_records(out / "rules", record_type="final")
    assert sorted(r["rule"] for r in rules) == ["backprop", "dfa"]
    assert "| digits | resmlp | dfa" in summary and "1 (exact)" in summary
    assert len(list((out / "rules" / "checkpoints").glob("*.pt"))) == 2
    assert len(read_records(out / "stress.jsonl", record_type="final")) == 2
    assert [r["variant"] for r in read_records(out / "toy_lq.jsonl", record_type="final")] == [
        "dfa"]
    report = write_report(out).markdown.read_text(encoding="utf-8")
    toy = report.split("## Toy LQ credit quality")[1].split("## ")[0]
    assert "| dfa " in toy and "toy_lq" not in report.split("## Toy LQ")[0]

    # an interrupted dfa run (it cannot resume: no feedback nets in its checkpoint) starts
    # over with a clean record file; finished runs and sections are skipped
    dfa = next(p for p in (out / "rules").glob("*.jsonl")
               if read_records(p, record_type="final")[0]["rule"] == "dfa")
    lines = dfa.read_text(encoding="utf-8").splitlines(keepends=True)
    dfa.write_text("".join(lines[:-1]) + lines[-1][:20], encoding="utf-8")  # final cut mid-line
    before = {p: p.read_bytes() for p in [out / "stress.jsonl", out / "toy_lq.jsonl",
                                          *(out / "opt").glob("*.jsonl")]}
    again = run_sweep(path, out, workers=1, progress=False)
    assert [line for line in again.splitlines() if line.startswith("## ")] == headings
    recs = read_records(dfa)
    assert [r["record_type"] for r in recs].count("final") == 1
    assert [r["epoch"] for r in recs if r["record_type"] == "epoch"] == [1]
    assert all(p.read_bytes() == b for p, b in before.items())


def test_sections_are_rewritten_without_resume(tmp_path, one_thread):
    data = tomllib.loads(MULTI)
    data["grid"] = data["grid"][:1]
    suite = load_suite(data)
    run_suite(suite, tmp_path, workers=1, progress=False, resume=False)
    run_suite(suite, tmp_path, workers=1, progress=False, resume=False)
    assert len(read_records(tmp_path / "stress.jsonl", record_type="final")) == 2
    assert len(read_records(tmp_path / "opt", record_type="final")) == 2
    assert not (tmp_path / "opt" / "checkpoints").exists()


def test_override_suite_sets_seeds_epochs_and_steps():
    data = override_suite(bench_suite(), seeds=[4], epochs=2, quant_epochs=3, rule_epochs=5,
                          stress_steps=7, toy_lq_steps=9)
    suite = load_suite(data)
    epochs = {g.name: {s.epochs for s in g.specs} for g in suite.grids}
    assert epochs == {"digits": {2}, "mnist1d": {2}, "quant": {3}, "rules": {5}}
    assert {s.seed for s in suite.specs} == {4}
    assert (suite.stress.steps, suite.stress.seeds) == (7, (4,))
    assert (suite.toy_lq.steps, suite.toy_lq.seeds) == (9, (4,))
    kept = load_suite(override_suite(bench_suite(), quant_epochs=3))
    assert {g.name: g.specs[0].epochs for g in kept.grids} == {
        "digits": 20, "mnist1d": 50, "quant": 3, "rules": 10}
    with pytest.raises(ValueError, match=r"\[\[grid\]\] #1 'digits': epochs: Input should be "
                       "greater than or equal to 1, got 0"):
        load_suite(override_suite(bench_suite(), epochs=0))


def test_cifar10_ablation_suite_holds_the_original_recipes_and_trains(tmp_path, monkeypatch,
                                                                       one_thread):
    """configs/cifar10_ablation.toml: fp32 + SGD, strict_bitnet + Chimera21, chimera (sparse,
    target bits on alpha_override) + Chimera21; each recipe's first run trains one batch on a
    tiny CIFAR-10 in the real format."""
    import dataclasses

    from chimera.data.cifar10 import write_cifar10_fixture
    from chimera.run.trainer import train

    suite = load_suite(Path(__file__).resolve().parents[2] / "configs" / "cifar10_ablation.toml")
    recipes = {g.name: g.specs for g in suite.grids}
    assert list(recipes) == ["fp32_sgd", "strict_bitnet", "chimera_sparse"]
    firsts = [specs[0] for specs in recipes.values()]
    assert [(s.optimizer, s.quantizer) for s in firsts] == [
        ("sgd", "fp32"), ("chimera21", "strict_bitnet"), ("chimera21", "chimera")]
    assert all(s.optimizer_hparams["lr"] == 1e-3 and s.batch_size == 16 and s.epochs == 1
               for s in firsts)
    assert [s.controller_config for s in firsts[:2]] == [None, None]
    assert firsts[2].controller_config["affects"] == "alpha_override"
    assert firsts[2].controller_config["target_bits"] == 1.32
    assert firsts[1].quant_config.skip == firsts[2].quant_config.skip == ()
    assert {s.seed for s in suite.specs} == {7, 8, 9}

    monkeypatch.setenv("CHIMERA_DATA", str(write_cifar10_fixture(tmp_path / "c10", 4)))
    for spec in firsts:
        tiny = dataclasses.replace(spec, batch_size=4, eval_batch_size=2, max_batches=1,
                                   eval_max_batches=1)
        final = train(tiny, progress=False)
        assert final["steps"] == 1 and final["test_loss"] is not None
        assert (final.get("quant_num_ternary_layers") or 0) == (22 if spec.quantizer != "fp32"
                                                                 else 0)


def test_record_fields_of_a_section_reach_every_record_and_keep_run_ids(tmp_path, one_thread):
    """How `chimera tune` marks its phases: fields of the section, not of the spec; `chimera
    sweep` runs a suite's declared values and ignores its [tune] table."""
    data = {"task": "digits", "model": "mlp", "optimizer": "adamw", "seeds": [0], "epochs": 1,
            "batch_size": 256, "max_batches": 2, "optimizer_hparams": {"lr": 1e-2},
            "tune": {"params": {"lr": [1e-3, 1e-1]}}}
    suite = load_suite(data)
    [grid] = suite.grids
    plain = load_suite({k: v for k, v in data.items() if k != "tune"})
    assert suite.specs == plain.specs and suite.tune is not None and plain.tune is None
    marked = dataclasses.replace(suite, grids=(dataclasses.replace(
        grid, record_fields={"phase": "final"}),))
    run_suite(marked, tmp_path / "out", workers=1, progress=False)
    records = read_records(tmp_path / "out")
    assert records and {r["phase"] for r in records} == {"final"}
    assert {r["run_id"] for r in records} == {s.run_id for s in plain.specs}
