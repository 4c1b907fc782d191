"""``chimera tune``: the [tune] table, the search on tuning seeds, tuned.toml, the final runs on
the reporting seeds, resume after a kill, and the report's sensitivity section."""

import tomllib
from types import SimpleNamespace

import pytest
import torch

from chimera.bench.jobs import tune
from chimera.bench.report.sensitivity import (
    Curve,
    curve_table,
    plot_sensitivity,
    tuning_curves,
)
from chimera.bench.suite import execute
from chimera.bench.suite.schema import load_suite
from chimera.bench.suite.sections import ParamRange, TuneSection
from chimera.cli import main
from chimera.run.records import read_records

DIGITS = """
task = "digits"
model = "mlp"
optimizer = "adamw"
seeds = [0, 1]
epochs = 2
batch_size = 64
max_batches = 10

[tune]
params = { lr = [1e-4, 1e-2, 3.0] }
"""
COMMAND = "chimera tune suite.toml --out DIR"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write(tmp_path, text=DIGITS, name="suite.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run(path, out):
    return tune.run_tune(path, out, workers=1, progress=False, command=COMMAND)


@pytest.fixture(scope="module")
def tuned_digits(tmp_path_factory):
    """The uninterrupted reference: DIGITS tuned into a fresh folder."""
    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("tune")
    summary = run(write(tmp), tmp / "out")
    torch.set_num_threads(threads)
    return tmp / "out", summary


def test_tune_picks_the_lr_by_validation_and_reports_on_disjoint_seeds(tuned_digits):
    out, summary = tuned_digits
    tuned = tomllib.loads((out / "tuned.toml").read_text(encoding="utf-8"))
    assert "tune" not in tuned and (out / "tuned.toml").read_text().startswith(f"# Written by "
                                                                               f"`{COMMAND}`")
    [grid] = tuned["grid"]
    assert grid["optimizer_hparams"] == {"lr": 1e-2} and grid["seeds"] == [0, 1]
    searched = read_records(out / "tune", record_type="final")
    finals = read_records(out / "final" / "tuned", record_type="final")
    assert {r["phase"] for r in searched} == {"tune"} and {r["phase"] for r in finals} == {"final"}
    assert sorted({r["seed"] for r in searched}) == [1000, 1001]  # one per reporting seed
    assert sorted(r["seed"] for r in finals) == [0, 1]
    assert {r["optimizer_hparams"]["lr"] for r in finals} == {1e-2}
    by_lr = {}
    for r in searched:
        by_lr.setdefault(r["optimizer_hparams"]["lr"], []).append(r["val_accuracy"])
    assert sorted(by_lr) == [1e-4, 1e-2, 3.0] and all(len(v) == 2 for v in by_lr.values())
    assert max(by_lr, key=lambda lr: sum(by_lr[lr])) == 1e-2
    # a record field, not a spec field: the final runs keep the ids a sweep gives them
    assert {r["run_id"] for r in finals} == {
        s.run_id for s in load_suite(out / "tuned.toml").specs}
    assert "| - | digits/mlp adamw fp32 backprop | optimizer_hparams.lr = 0.01 |" in summary
    assert (out / "summary.md").read_text(encoding="utf-8") == summary


def test_the_report_shows_the_lr_sensitivity_and_keeps_tuning_runs_out_of_the_tables(
        tuned_digits):
    out, _ = tuned_digits
    report = (out / "report.md").read_text(encoding="utf-8")
    assert (out / "tuning_sensitivity.png").stat().st_size > 0
    head, section = report.split("## Tuning: validation metric vs candidate")
    assert "2 training" not in head and "(1 training" in head  # the final configuration only
    table = section.split("### digits/mlp adamw fp32 backprop")[1].split("\n\n")[1]
    rows = table.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 0.0001", "| 0.01", "| 3.0"]
    assert rows[1].endswith("| 2 | ★ chosen |") and "chosen" not in rows[0] + rows[2]
    assert "![validation metric vs tuning candidate" in report


class Killed(BaseException):
    """A kill of the process, as the interrupted command sees it."""


def kill_when(monkeypatch, condition):
    """Make the job of every run raise Killed once ``condition(fields, calls)`` holds."""
    real, calls = execute._run_one, []

    def flaky(spec, path, checkpoint, sinks=(), fields=None):
        calls.append(path)
        if condition(fields or {}, len(calls)):
            raise Killed
        return real(spec, path, checkpoint, sinks, fields)

    monkeypatch.setattr(execute, "_run_one", flaky)


def test_tune_resumes_after_a_kill_and_writes_the_same_tuned_toml(tmp_path, monkeypatch,
                                                                  tuned_digits, one_thread):
    reference, _ = tuned_digits
    path, out = write(tmp_path), tmp_path / "out"
    with monkeypatch.context() as m:  # killed after two of the six tuning runs
        kill_when(m, lambda fields, n: n == 3)
        with pytest.raises(Killed):
            run(path, out)
    done = {p.name: p.read_bytes() for p in (out / "tune").glob("*.jsonl")
            if read_records(p, record_type="final")}
    assert len(done) == 2 and not (out / "tuned.toml").exists()
    with monkeypatch.context() as m:  # killed again as the final phase starts
        kill_when(m, lambda fields, n: fields.get("phase") == "final")
        with pytest.raises(Killed):
            run(path, out)
    searched = {p.name: p.read_bytes() for p in (out / "tune").glob("*.jsonl")}
    assert len(searched) == 6 and all(searched[name] == data for name, data in done.items())
    assert (out / "tuned.toml").read_bytes() == (reference / "tuned.toml").read_bytes()
    run(path, out)
    assert {p.name: p.read_bytes() for p in (out / "tune").glob("*.jsonl")} == searched
    assert (out / "tuned.toml").read_bytes() == (reference / "tuned.toml").read_bytes()
    finals = read_records(out / "final" / "tuned", record_type="final")
    assert sorted(r["seed"] for r in finals) == [0, 1]


def test_tpe_search_is_reproducible_and_resumes(tmp_path, one_thread):
    text = DIGITS.replace("seeds = [0, 1]", "seeds = [0]").replace(
        "params = { lr = [1e-4, 1e-2, 3.0] }",
        'sampler = "tpe"\ntrials = 3\nparams = { lr = { log = [1e-3, 1e-1] } }')
    path, out = write(tmp_path, text), tmp_path / "out"
    run(path, out)
    searched = read_records(out / "tune", record_type="final")
    lrs = [r["optimizer_hparams"]["lr"] for r in searched]
    assert len(set(lrs)) == 3 and all(1e-3 <= lr <= 1e-1 for lr in lrs)
    assert {r["seed"] for r in searched} == {1000}
    chosen = max(searched, key=lambda r: (r["val_accuracy"], -r["optimizer_hparams"]["lr"])
                 )["optimizer_hparams"]  # ties: the smallest lr
    tuned = tomllib.loads((out / "tuned.toml").read_text(encoding="utf-8"))
    assert tuned["grid"][0]["optimizer_hparams"] == chosen
    before = {p.name: p.read_bytes() for p in (out / "tune").glob("*.jsonl")}
    toml = (out / "tuned.toml").read_bytes()
    run(path, out)  # the same trials again: every run is found finished
    assert {p.name: p.read_bytes() for p in (out / "tune").glob("*.jsonl")} == before
    assert (out / "tuned.toml").read_bytes() == toml


def test_log_and_linear_ranges_and_the_grid_of_candidates():
    assert ParamRange(1e-4, 1e-1, log=True, num=4).values() == (1e-4, 1e-3, 1e-2, 1e-1)
    assert ParamRange(0.0, 0.3, log=False, num=4).values() == (0.0, 0.1, 0.2, 0.3)
    suite = load_suite({"task": "digits", "model": "mlp", "optimizer": "sgd", "tune": {
        "params": {"lr": {"log": [1e-3, 1e-1], "num": 3},
                   "optimizer_hparams.momentum": [0.0, 0.9]}}})
    space = suite.tune
    assert space.seeds == (1000,) and space.maximize and space.sampler == "grid"
    assert space.grid() == [{"optimizer_hparams.lr": lr, "optimizer_hparams.momentum": m}
                            for lr in (1e-3, 1e-2, 1e-1) for m in (0.0, 0.9)]
    spec = space.apply(suite.specs[0], space.grid()[-1], seed=1000)
    assert spec.optimizer_hparams == {"lr": 0.1, "momentum": 0.9} and spec.seed == 1000
    assert load_suite({"task": "digits", "model": "mlp", "optimizer": "adamw",
                       "tune": {"params": {"lr": [1e-3]}, "metric": "val_loss"}}).tune.maximize \
        is False


def test_tuned_toml_holds_every_configuration_of_every_section():
    """Configurations of one grid may get different values: one [[grid]] each, same sections,
    titles and stress / toy LQ tables; loading it gives exactly the chosen runs."""
    suite = load_suite({
        "name": "multi", "task": "digits", "model": "mlp", "seeds": [0, 1], "epochs": 1,
        "stress": {"problems": ["regression"], "configs": ["sgd"], "steps": 5, "lr": 1e-2},
        "toy_lq": {"rules": ["dfa"], "steps": 3},
        "grid": [{"name": "opt", "title": "Optimizers", "optimizers": ["adamw", "sgd"],
                  "optimizer_hparams": {"lr": 1e-3}},
                 {"name": "deep", "model": "mlp", "model_hparams": {"hidden": 16},
                  "optimizer": "adamw",
                  "seeds": [2]}],
        "tune": {"params": {"lr": [1e-3, 1e-2]}, "seeds": [7]},
        "resources": {"num_cpus": 2, "num_gpus": 0.5}})
    configs = tune.configurations(suite)
    assert [(c.section.name, c.spec.optimizer, c.seeds) for c in configs] == [
        ("opt", "adamw", (0, 1)), ("opt", "sgd", (0, 1)), ("deep", "adamw", (2,))]
    for config, scores in zip(configs, ([0.5, 0.7], [0.9, 0.1], [None, 0.2]), strict=True):
        config.tried = [({"optimizer_hparams.lr": lr}, s)
                        for lr, s in zip([1e-3, 1e-2], scores, strict=True)]
    text = tune.tuned_toml(suite, configs, COMMAND)
    tuned = load_suite(tomllib.loads(text))
    assert tuned.tune is None and tuned.name == "multi"
    assert tuned.stress == suite.stress and tuned.toy_lq == suite.toy_lq
    assert tuned.resources == suite.resources
    assert [(g.name, g.title) for g in tuned.grids] == [("opt", "Optimizers"), ("deep", "deep")]
    expected = [suite.tune.apply(c.spec, {"optimizer_hparams.lr": lr}, seed)
                for c, lr in zip(configs, [1e-2, 1e-3, 1e-2], strict=True) for seed in c.seeds]
    assert tuned.specs == expected
    configs[2].tried = [({"optimizer_hparams.lr": 1e-3}, None)]
    with pytest.raises(ValueError, match="no candidate of digits-mlp-adamw-.* gave a finite"):
        tune.tuned_toml(suite, configs, COMMAND)


def test_optuna_proposals_depend_on_the_seed_and_the_told_scores_only():
    space = TuneSection(params={"optimizer_hparams.lr": ParamRange(1e-4, 1e-1, log=True),
                                "optimizer_hparams.weight_decay": (0.0, 0.1)},
                        sampler="random", trials=4)

    def proposals(space):
        proposer = tune._OptunaProposer(space)
        asked = []
        for score in (0.3, None, 0.5, 0.4):
            [values] = proposer.ask()
            asked.append(values)
            proposer.tell([score])
        return asked

    first = proposals(space)
    assert first == proposals(space)
    assert all(1e-4 <= v["optimizer_hparams.lr"] <= 1e-1 for v in first)
    assert {v["optimizer_hparams.weight_decay"] for v in first} <= {0.0, 0.1}
    other = TuneSection(params=space.params, sampler="random", trials=4, sampler_seed=1)
    assert proposals(other) != first


def test_sensitivity_curves_from_records_alone():
    def final(lr, seed, loss, hidden=32):
        return {"record_type": "final", "phase": "tune", "run_id": f"r{lr}{seed}{hidden}",
                "task": "digits", "model": "mlp", "optimizer": "adamw", "quantizer": "fp32",
                "rule": "backprop", "seed": seed, "optimizer_hparams": {"lr": lr},
                "model_hparams": {"hidden": hidden}, "tune_params": ["optimizer_hparams.lr"],
                "tune_metric": "val_loss", "val_loss": loss}

    records = [final(0.1, 1000, 0.5), final(0.1, 1001, 0.7), final(0.01, 1000, 0.4),
               final(0.01, 1001, 0.4), final(1.0, 1000, None), final(1.0, 1001, 0.1),
               final(0.1, 1000, 0.9, hidden=64), {"record_type": "final", "run_id": "x"}]
    curves = tuning_curves(records)
    assert [c.label.split(" #")[0] for c in curves] == ["digits/mlp adamw fp32 backprop"] * 2
    assert curves[0].label != curves[1].label  # told apart by their base configuration
    assert curves[0].chosen() == (0.01,)  # val_loss: the lowest mean; lr 1.0 failed a seed
    rows = curve_table(curves[0]).splitlines()[2:]
    assert rows[0] == "| 0.01 | 0.4000 ± 0.0000 | 2 | ★ chosen |"
    assert rows[2] == "| 1.0 | 0.1000 ± 0.0000 | 2 | ⚠ 1 of 2 without a finite value |"



@pytest.mark.parametrize("order", [[3.0, 1e-2, 1e-4], [1e-4, 3.0, 1e-2]])
def test_ties_go_to_the_smallest_candidate_in_tune_and_report_alike(order):
    """Accuracies are multiples of 1/n, so equal means happen: tuned.toml and the report's
    ★ pick the same candidate whatever order the candidates were tried or read in."""
    space = TuneSection(params={"optimizer_hparams.lr": tuple(order)})
    scores = {3.0: 0.9, 1e-2: 0.9, 1e-4: 0.5}
    config = tune.Tuned(section=None, spec=None, seeds=(0,),
                        tried=[({"optimizer_hparams.lr": lr}, scores[lr]) for lr in order])
    assert config.best(space) == ({"optimizer_hparams.lr": 1e-2}, 0.9)
    curve = Curve("c", ("optimizer_hparams.lr",), "val_accuracy",
                  [((lr,), [scores[lr], scores[lr]]) for lr in order])
    assert curve.chosen() == (1e-2,)
    failed = tune.Tuned(section=None, spec=SimpleNamespace(config_id="cfg"), seeds=(0,),
                        tried=[({"optimizer_hparams.lr": 1e-2}, None)])
    with pytest.raises(ValueError, match="no candidate of cfg gave a finite val_accuracy"):
        failed.best(space)

BAD = [
    ("params = {}", "params: Dictionary should have at least 1 item"),
    ('params = { "foo_hparams.x" = [1] }', "params.foo_hparams.x.\\[key\\]: a tuned key is KEY"),
    ("params = { lr = [] }", "params.lr: List should have at least 1 item"),
    ("params = { lr = [1e-3, 1e-3] }", "params.lr: candidates must be distinct"),
    ("params = { lr = [nan] }", "params.lr: candidate must be a finite number, got nan"),
    ("params = { lr = 0.1 }", "params.lr: must be a list of candidates or a range table"),
    ("params = { lr = { log = [0, 1], num = 3 } }", "params.lr: a log range needs low > 0"),
    ("params = { lr = { log = [1e-1, 1e-3], num = 3 } }", "params.lr: a range is \\[low, high\\]"),
    ("params = { lr = { log = [1e-3, 1e-1], num = 1 } }",
     "params.lr.num: Input should be greater than or equal to 2"),
    ("params = { lr = { log = [1e-3, 1e-1], linear = [0, 1], num = 2 } }",
     "params.lr: a range sets exactly one of 'log' and 'linear'"),
    ("params = { lr = { log = [1e-3, 1e-1] } }", "params.lr: sampler 'grid' needs num = N"),
    ("params = { lr = { log = [1e-3, 1e-1], step = 2 } }", "params.lr: no key 'step'"),
    ('sampler = "tpe"\nparams = { lr = [1e-3] }', "sampler 'tpe' needs trials = N"),
    ("trials = 3\nparams = { lr = [1e-3] }", "trials goes with sampler 'random' or 'tpe'"),
    ('sampler = "bayes"\nparams = { lr = [1e-3] }', "sampler: Input should be 'grid', 'random'"),
    ('sampler = "tpe"\ntrials = 2\nparams = { betas = [[0.9, 0.99]] }',
     "params.betas: sampler 'tpe' takes numbers, strings or booleans"),
    ('metric = "test_accuracy"\nparams = { lr = [1e-3] }',
     "metric: Input should be 'val_accuracy' or 'val_loss'"),
    ("seeds = [1, 5]\nparams = { lr = [1e-3] }",
     "seeds: tuning seeds \\[1\\] are also reporting seeds of a grid"),
    ("budget = 3\nparams = { lr = [1e-3] }", "no key 'budget'; allowed: params, sampler"),
    ("params = { momentum = [0.9] }",
     "params.optimizer_hparams.momentum = 0.9: optimizer 'adamw' has no hyper-parameter"),
    ("params = { lr = [1e-3, -1.0] }", "params.optimizer_hparams.lr = -1.0: run digits-mlp-"),
    ("params = { \"model_hparams.hidden\" = [1.5] }",
     "params.model_hparams.hidden = 1.5: run digits-mlp-adamw-.*-s0: hidden must be an integer"),
]


@pytest.mark.parametrize(("table", "message"), BAD)
def test_bad_tune_tables_give_one_line(table, message, tmp_path):
    text = DIGITS.split("[tune]")[0] + "[tune]\n" + table + "\n"
    with pytest.raises(ValueError, match=message) as error:
        load_suite(write(tmp_path, text))
    assert str(error.value).startswith(f"{tmp_path / 'suite.toml'} [tune]: ")
    assert "\n" not in str(error.value)


def test_tune_needs_grids_and_a_tune_table(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^suite \[tune\]: a \[tune\] table needs training grids"):
        load_suite({"stress": {"steps": 5}, "tune": {"params": {"lr": [1e-3]}}})
    plain = write(tmp_path, DIGITS.split("[tune]")[0])
    assert main(["tune", str(plain), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"chimera: error: {plain} has no [tune] table "
                   "(docs/suites.md#tuning-chimera-tune)")
    assert not (tmp_path / "out").exists()


def test_sensitivity_plot_takes_several_addresses_and_non_numeric_candidates(tmp_path):
    def final(lr, betas, seed, acc):
        return {"record_type": "final", "phase": "tune", "run_id": f"r{lr}{betas}{seed}",
                "task": "digits", "model": "mlp", "optimizer": "adamw", "quantizer": "fp32",
                "rule": "backprop", "seed": seed, "optimizer_hparams": {"lr": lr, "betas": betas},
                "tune_params": ["optimizer_hparams.lr", "optimizer_hparams.betas"],
                "tune_metric": "val_accuracy", "val_accuracy": acc}

    records = [final(lr, b, s, lr * 10 + b[1] + (s - 1000) / 100) for lr in (1e-3, 1e-2)
               for b in ([0.9, 0.99], [0.9, 0.999]) for s in (1000, 1001)]
    [curve] = tuning_curves(records)
    assert curve.chosen() == (1e-2, [0.9, 0.999])
    assert "| 0.01 | [0.9,0.999] | 1.1040 ± 0.0071 | 2 | ★ chosen |" in curve_table(curve)
    plot_sensitivity([curve], tmp_path / "tuning.png")
    assert (tmp_path / "tuning.png").read_bytes()[:4] == b"\x89PNG"
