import numpy as np
import pytest

from chimera.bench.report.rules_plots import cosine_curves
from chimera.bench.report.write import collect_configurations, write_report
from chimera.run.records import RecordWriter, read_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rule_run(root, rule, seed, *, per_layer=True, acc=0.5):
    config_id = f"cfg-{rule}"
    identity = {"run_id": f"{config_id}-s{seed}", "config_id": config_id, "task": "mnist1d",
                "model": "resmlp", "optimizer": "adamw", "quantizer": "fp32", "rule": rule,
                "seed": seed, "epochs": 2}
    with RecordWriter(root / f"{config_id}-s{seed}.jsonl", identity) as w:
        for epoch in (1, 2):
            diag = {"credit_costate_cosine": 0.1 * epoch + 0.1 * seed}
            if per_layer:
                diag["credit_costate_cosine_per_layer"] = [0.1 * epoch, 0.2 * epoch + seed]
            w.write("eval", epoch=epoch, step=epoch * 10, val_accuracy=acc, **diag)
        w.write("final", test_accuracy=acc + 0.01 * seed, test_loss=1.0)


def test_cosine_curves_are_per_layer_means_over_seeds_or_the_mean(tmp_path):
    for seed in (0, 1):
        _rule_run(tmp_path, "credit_bridge", seed)
        _rule_run(tmp_path, "dfa", seed, per_layer=False)
    configs = {c.identity["rule"]: c for c in collect_configurations(
        r for p in sorted(tmp_path.glob("*.jsonl")) for r in read_records(p))}
    epochs, curves = cosine_curves(configs["credit_bridge"])
    np.testing.assert_allclose(epochs, [1, 2])
    np.testing.assert_allclose(curves["h_0"], [0.1, 0.2])
    np.testing.assert_allclose(curves["h_1"], [0.7, 0.9])  # epoch 1: (0.2 + 1.2) / 2 over seeds
    epochs, curves = cosine_curves(configs["dfa"])
    assert list(curves) == ["mean"]
    np.testing.assert_allclose(curves["mean"], [0.15, 0.25])


def test_report_draws_the_rule_plots_and_links_them(tmp_path):
    for rule, acc in (("credit_bridge", 0.3), ("dfa", 0.25), ("backprop", 0.6)):
        for seed in (0, 1):
            _rule_run(tmp_path, rule, seed, per_layer=rule != "dfa", acc=acc)
    paths = write_report(tmp_path, tmp_path / "out")
    names = {p.name for p in paths.plots}
    assert {"credit_cosine.png", "accuracy_by_rule.png"} <= names
    text = paths.markdown.read_text(encoding="utf-8")
    for name in ("credit_cosine.png", "accuracy_by_rule.png"):
        path = tmp_path / "out" / name
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
        assert f"]({name})" in text


@pytest.mark.parametrize("rules", [("dfa",), ()])
def test_rule_plots_are_skipped_without_their_data(tmp_path, rules):
    for rule in rules:
        _rule_run(tmp_path, rule, 0)
    with RecordWriter(tmp_path / "s.jsonl", {"run_id": "r", "config_id": "p-c", "seed": 0,
                                             "task": "stress/p", "problem": "p",
                                             "config": "c"}) as w:
        w.write("final", final_loss=1.0, median_step_time_s=0.001, optimizer_state_bytes=8)
    paths = write_report(tmp_path, tmp_path / "out")
    names = {p.name for p in paths.plots}
    assert "accuracy_by_rule.png" not in names  # one rule at most: nothing to compare
    assert ("credit_cosine.png" in names) == bool(rules)
    text = paths.markdown.read_text(encoding="utf-8")
    assert "`accuracy_by_rule.png`: skipped (fewer than two learning rules" in text
