import pytest

from chimera.bench.jobs.toy_lq import check_overrides, run_toy_lq, variant_hparams
from chimera.cli import main
from chimera.run.records import RecordWriter, read_records


def test_overrides_reach_the_variants_whose_rule_takes_them():
    assert variant_hparams("credit_bridge_tgw0", {"fm_weight": 1.0, "K": 2}) == (
        "credit_bridge", {"term_grad_weight": 0.0, "fm_weight": 1.0, "K": 2})
    assert variant_hparams("state_bridge", {"fm_weight": 1.0, "K": 2}) == (
        "state_bridge", {"K": 2})
    assert variant_hparams("dfa", {"fm_weight": 1.0}) == ("dfa", {})


def test_overrides_are_checked_by_the_rules_own_checks():
    with pytest.raises(ValueError, match="no hyper-parameter 'lam'; allowed: K, bridge_hidden"):
        check_overrides(["dfa", "state_bridge"], {"lam": 0.1})
    with pytest.raises(ValueError, match="^lam must be a number > 0"):
        check_overrides(["dfa", "credit_bridge"], {"lam": 0.0})
    with pytest.raises(ValueError, match="^fb_steps must be an integer >= 1"):
        run_toy_lq(["credit_bridge"], seeds=[0], steps=1, progress=False,
                   overrides={"fb_steps": 0})
    check_overrides(["credit_bridge"], {"fm_weight": 0.5})


def test_overridden_runs_record_their_hyper_parameters_under_their_own_config(tmp_path):
    with RecordWriter(tmp_path / "toy.jsonl") as w:
        finals = run_toy_lq(["credit_bridge", "dfa"], seeds=[0], steps=2, writer=w,
                            progress=False, overrides={"fm_weight": 1.0, "K": 2})
    by = {f["variant"]: f for f in finals}
    assert by["credit_bridge"]["rule_hparams"] == {"fm_weight": 1.0, "K": 2}
    assert by["credit_bridge"]["config_id"] == "toy_lq-credit_bridge[K=2,fm_weight=1.0]"
    assert by["dfa"]["config_id"] == "toy_lq-dfa" and by["dfa"]["rule_hparams"] == {}
    finals_read = [r for r in read_records(tmp_path / "toy.jsonl")
                   if r["record_type"] == "final"]
    assert {r["config_id"] for r in finals_read} == {f["config_id"] for f in finals}


def test_cli_rule_arg_is_parsed_and_checked_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "toy.jsonl"
    assert main(["toy-lq", "--rules", "credit_bridge", "--seeds", "1", "--steps", "2",
                 "--rule-arg", "fm_weight=-1", "--out", str(out)]) == 2
    assert "fm_weight must be a number >= 0" in capsys.readouterr().err and not out.exists()
    assert main(["toy-lq", "--rules", "credit_bridge", "--seeds", "1", "--steps", "2",
                 "--quiet", "--rule-arg", "fm_weight=0.5", "--out", str(out)]) == 0
    finals = [r for r in read_records(out) if r["record_type"] == "final"]
    assert finals[0]["rule_hparams"] == {"fm_weight": 0.5}
