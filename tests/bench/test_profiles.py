import json
import math

import numpy as np
import pytest

from chimera.bench.report.profiles import (
    PROFILE_PNG,
    area_score,
    performance_ratios,
    profile,
)
from chimera.bench.report.targets import (
    DEFAULT_TARGETS,
    SECONDS_KEY,
    median_time,
    parse_target_options,
    reached_mean,
    resolve_targets,
    run_time,
    target_for,
)
from chimera.bench.report.write import write_report
from chimera.cli import main
from chimera.run.records import RecordWriter

INF = math.inf
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Hand-computed example. Best times: w1 10 (a tie of A and B), w2 20 (B), w3 100 (B); C did
# not run w3. Ratios: A (1, 2, inf), B (1, 1, 1), C (5, inf, inf).
TIMES = {"A": {"w1": 10, "w2": 40, "w3": INF},
         "B": {"w1": 10, "w2": 20, "w3": 100},
         "C": {"w1": 50, "w2": INF}}


def test_ratios_by_hand_with_tie_missing_and_not_reached():
    r = performance_ratios(TIMES)
    assert r == {"A": {"w1": 1.0, "w2": 2.0, "w3": INF},
                 "B": {"w1": 1.0, "w2": 1.0, "w3": 1.0},
                 "C": {"w1": 5.0, "w2": INF, "w3": INF}}


def test_profile_by_hand():
    r = performance_ratios(TIMES)
    taus = [1.0, 1.5, 2.0, 4.0, 5.0]
    np.testing.assert_allclose(profile(list(r["A"].values()), taus), [1/3, 1/3, 2/3, 2/3, 2/3])
    np.testing.assert_allclose(profile(list(r["B"].values()), taus), [1, 1, 1, 1, 1])
    np.testing.assert_allclose(profile(list(r["C"].values()), taus), [0, 0, 0, 0, 1/3])


def test_area_by_hand_and_r_max_clipping():
    r = performance_ratios(TIMES)
    # A: (1/3) * ((4-1) + (4-2) + 0) / 3 = 5/9;  B: 1;  C: its ratio 5 > r_max gets no credit.
    assert area_score(list(r["A"].values())) == pytest.approx(5 / 9)
    assert area_score(list(r["B"].values())) == pytest.approx(1.0)
    assert area_score(list(r["C"].values())) == 0.0
    assert area_score(list(r["C"].values()), r_max=6.0) == pytest.approx((6 - 5) / (3 * 5))
    # the exact area agrees with a fine trapezoid integral of rho over [1, r_max]
    taus = np.linspace(1.0, 4.0, 300_001)
    rho = profile(list(r["A"].values()), taus)
    trapezoid = float(np.sum((rho[1:] + rho[:-1]) / 2 * np.diff(taus))) / 3.0
    assert trapezoid == pytest.approx(5 / 9, abs=1e-4)


def test_one_workload_reduces_to_a_step():
    r = performance_ratios({"fast": {"w": 10}, "slow": {"w": 25}, "never": {"w": INF}})
    assert [area_score([r[s]["w"]]) for s in ("fast", "slow", "never")] == \
        pytest.approx([1.0, (4 - 2.5) / 3, 0.0])
    np.testing.assert_array_equal(profile([2.5], [1.0, 2.4, 2.5, 4.0]), [0, 0, 1, 1])


def test_workload_nobody_reaches_counts_against_everyone():
    r = performance_ratios({"A": {"w1": 5, "w2": INF}, "B": {"w1": 10, "w2": INF}})
    assert r["A"] == {"w1": 1.0, "w2": INF}
    assert area_score(list(r["A"].values())) == pytest.approx(0.5)
    assert area_score(list(r["B"].values())) == pytest.approx((4 - 2) / 3 / 2)


@pytest.mark.parametrize("call, match", [
    (lambda: performance_ratios({"A": {"w": 0}}), r"times\['A'\]\['w'\] must be"),
    (lambda: performance_ratios({"A": {"w": "fast"}}), "must be a number"),
    (lambda: area_score([0.5]), "ratio must be a number >= 1"),
    (lambda: area_score([]), "ratios must be a non-empty sequence"),
    (lambda: area_score([1.0], r_max=1.0), "r_max must be a number > 1"),
    (lambda: profile([math.nan], [1.0]), "ratio must be"),
])
def test_bad_input_is_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _evals(accs, seconds=True):
    return [{"epoch": e, "step": 10 * e, "seed": 0, "val_accuracy": a,
             **({SECONDS_KEY: 1.5 * e} if seconds else {})} for e, a in enumerate(accs, 1)]


def test_run_time_first_eval_at_or_above_target():
    evals = _evals([0.5, 0.9, 0.95, 0.99])
    t = run_time(evals[::-1], 0.9)  # order of the records does not matter; >= counts
    assert (t.steps, t.seconds, t.epoch, t.reached) == (20.0, 3.0, 2, True)
    never = run_time(evals, 0.999)
    assert (never.steps, never.seconds, never.epoch, never.reached) == (INF, INF, None, False)
    assert run_time(_evals([0.95], seconds=False), 0.9).seconds is None
    assert run_time([{"epoch": 1, "step": 10, "test_accuracy": 0.95}], 0.9,
                    "test_accuracy").steps == 10.0


def test_median_counts_not_reached_as_inf_and_mean_skips_it():
    assert median_time([100, 200, INF]) == 200
    assert median_time([100, INF, INF]) == INF
    assert median_time([100, INF]) == INF  # even count: the mean of the middle two
    assert reached_mean([100, 200, INF]) == 150
    assert reached_mean([INF]) is None


def test_targets_sources_and_precedence(tmp_path):
    assert resolve_targets(tmp_path) == DEFAULT_TARGETS
    (tmp_path / "targets.toml").write_text('[targets]\ndigits = 0.9\n"mnist1d/mlp" = 0.5\n')
    resolved = resolve_targets(tmp_path, parse_target_options(["digits=0.8"]))
    assert resolved == {**DEFAULT_TARGETS, "digits": 0.8, "mnist1d/mlp": 0.5}
    assert target_for(resolved, "mnist1d", "mlp") == 0.5  # task/model beats task
    assert target_for(resolved, "mnist1d", "resmlp") == DEFAULT_TARGETS["mnist1d"]
    assert target_for(resolved, "cifar10", "resnet20") is None
    # a task's entry replaces the earlier sources' entries of its models
    assert resolve_targets(tmp_path, {"mnist1d": 0.7}) == {"digits": 0.9, "mnist1d": 0.7}
    (tmp_path / "targets.toml").unlink()
    (tmp_path / "targets.json").write_text(json.dumps({"targets": {"digits": 0.7}}))
    assert resolve_targets(tmp_path)["digits"] == 0.7


@pytest.mark.parametrize("files, match", [
    ({"targets.toml": "[targets]\ndigits = 1.5\n"}, r"targets.toml targets\['digits'\] must be"),
    ({"targets.toml": "digits = 0.9\n"}, "a single \\[targets\\] table"),
    ({"targets.json": "{not json"}, "cannot be read"),
    ({"targets.toml": "[targets]\n", "targets.json": '{"targets": {}}'}, "one of"),
])
def test_bad_target_files(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        resolve_targets(tmp_path)


@pytest.mark.parametrize("item, match", [
    ("digits", "TASK=ACCURACY"), ("digits=high", "a number"), ("digits=0", "must be a number"),
    ("a/b/c=0.5", "a task name or task/model"),
])
def test_bad_target_options(item, match):
    with pytest.raises(ValueError, match=match):
        parse_target_options([item])


# Seeds' first epoch at or above the target (None: never): steps = 10 * epoch, seconds 1.5 *.
REACH = {("cnn", "adamw"): (2, 2, 3), ("cnn", "sgd"): (4, 4, None),
         ("mlp", "adamw"): (1, 1, 1), ("mlp", "sgd"): (None, None, None)}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("ttt")
    for (model, opt), reach in REACH.items():
        for seed, epoch in enumerate(reach):
            run_id = f"mnist1d-{model}-{opt}-s{seed}"
            identity = {"run_id": run_id, "config_id": run_id[:-3], "task": "mnist1d",
                        "model": model, "optimizer": opt, "quantizer": "fp32",
                        "rule": "backprop", "seed": seed, "epochs": 4}
            with RecordWriter(root / f"{run_id}.jsonl", identity) as w:
                for e in range(1, 5):
                    acc = 0.95 if epoch is not None and e >= epoch else 0.5
                    w.write("eval", epoch=e, step=10 * e, val_accuracy=acc,
                            **{SECONDS_KEY: 1.5 * e})
                w.write("final", epochs=4, steps=40, test_accuracy=0.9, val_accuracy=acc)
    return root


def test_report_section_and_plot(records, tmp_path):
    paths = write_report(records, tmp_path)
    text = paths.markdown.read_text()
    section = text[text.index("## Time to target"):text.index("## Plots")]
    rows = {(c := [x.strip() for x in line.split("|")])[1]: c[2:-1]
            for line in section.splitlines() if line.startswith("| mnist1d/")}
    assert rows["mnist1d/cnn · adamw fp32 backprop"] == [
        "val_accuracy ≥ 0.9", "3/3", "20", "23", "3.00", "3.50"]
    assert rows["mnist1d/cnn · sgd fp32 backprop"][1:4] == ["2/3", "40", "40"]
    assert rows["mnist1d/mlp · sgd fp32 backprop"] == [
        "val_accuracy ≥ 0.6", "0/3", "not reached", "-", "not reached", "-"]
    scores = {c[1]: c[2:6] for line in section.splitlines() if line.startswith("| ")
              and (c := [x.strip() for x in line.split("|")])[1].endswith("backprop")
              and c[2] == "2/2"}
    # steps ratios: cnn adamw 1, sgd 2; mlp adamw 1, sgd inf -> sgd (1/2)(4-2)/3 = 1/3
    assert scores["adamw fp32 backprop"] == ["2/2", "1.000", "1.000",
                                             "mnist1d/cnn 1.00, mnist1d/mlp 1.00"]
    assert scores["sgd fp32 backprop"] == ["2/2", "0.333", "0.333",
                                           "mnist1d/cnn 2.00, mnist1d/mlp ∞"]
    png = tmp_path / PROFILE_PNG
    assert png in paths.plots and png.read_bytes()[:8] == PNG_MAGIC
    assert f"![performance profiles over the time to target]({PROFILE_PNG})" in text


def test_cli_target_option_changes_the_report(records, tmp_path, capsys):
    assert main(["report", str(records), "--out", str(tmp_path), "--target", "mnist1d=0.99"]) == 0
    text = (tmp_path / "report.md").read_text()
    printed = capsys.readouterr().out
    assert printed.startswith("## Time to target") and "### Performance profile" in printed
    assert "val_accuracy ≥ 0.99" in printed and "## Plots" not in printed
    assert "val_accuracy ≥ 0.99" in text and "val_accuracy ≥ 0.9 " not in text
    assert "0/3" in text and "1.000" not in text
    assert f"`{PROFILE_PNG}`: skipped (no configuration reached a target)" in text
    assert not (tmp_path / PROFILE_PNG).exists()


def test_no_target_no_section(records, tmp_path):
    (tmp_path / "r").mkdir()
    for f in records.glob("*.jsonl"):
        (tmp_path / "r" / f.name).write_text(f.read_text().replace('"mnist1d"', '"digits_2d"'))
    paths = write_report(tmp_path / "r")
    text = paths.markdown.read_text()
    assert "## Time to target" not in text
    assert f"`{PROFILE_PNG}`: skipped" in text and not (tmp_path / "r" / PROFILE_PNG).exists()
