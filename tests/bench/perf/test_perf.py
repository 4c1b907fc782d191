"""``chimera perf optim|layers|rules`` end to end on tiny settings, and the timer they share.

No speed is asserted: only that every target runs, prints its table and goals, and writes valid
records.
"""

import pytest
import torch

from chimera.bench.perf import PERF_TARGETS
from chimera.bench.perf.optim_step import GPT2_SMALL, bytes_per_param, gpt2_parameters
from chimera.bench.perf.results import goal
from chimera.bench.perf.timing import milliseconds, time_cases, top_ops
from chimera.cli import main
from chimera.optim import STAC, Chimera21
from chimera.run.records import read_records

QUICK = ["--quick", "--no-compile", "--threads", "1"]


def run_target(target, tmp_path, capsys, *extra):
    out = tmp_path / f"{target}.jsonl"
    assert main(["perf", target, *QUICK, "--out", str(out), *extra]) == 0
    text = capsys.readouterr().out
    records = read_records(out)
    assert records and all(r["record_type"] == "summary" for r in records)
    assert {r["benchmark"] for r in records} == {f"perf-{target}"}
    assert all(r["device"] == "cpu" and r["threads"] == 1 and r["versions"]["torch"]
               for r in records)
    cases = [r for r in records if r["kind"] == "case"]
    goals = [r for r in records if r["kind"] == "goal"]
    assert goals and all(g["met"] in (True, False) and g["op"] in ("<=", ">=") for g in goals)
    assert text.count("\ngoal ") == len(goals) and f"records: {out}" in text
    return text, cases, goals


def test_registered_targets():
    assert PERF_TARGETS.names() == ["layers", "optim", "rules"]


def test_perf_optim_runs_every_optimizer(tmp_path, capsys):
    text, cases, goals = run_target("optim", tmp_path, capsys, "--shapes", "gpt2")
    assert "| shapes" in text and "x fused AdamW" in text
    names = {(c["optimizer"], c["variant"]) for c in cases}
    assert {("adamw", "fused"), ("adamw", "foreach"), ("chimera21", "default"),
            ("chimera21", "foreach"), ("chimera21", "for-loop"), ("stac", "default"),
            ("stac", "foreach"), ("lion", "for-loop"), ("scaled_optum", "default"),
            ("scaled_optum", "eager")} <= names
    assert not any(c["compiled"] for c in cases)  # --no-compile: no forced compile
    base = next(c for c in cases if c["variant"] == "fused" and c["optimizer"] == "adamw")
    assert base["ratio_vs_fused_adamw"] == 1.0 and base["state_bytes_per_param"] > 8
    for c in cases:
        assert c["median_ms"] > 0 and c["bound_fraction"] > 0 and c["num_tensors"] == 16
        assert c["state"]["total"] == pytest.approx(c["state_bytes_per_param"] * c["num_params"])
    so = next(c for c in cases if c["optimizer"] == "scaled_optum")
    assert so["state_bytes_per_param"] < 2 and 12 <= so["bytes_per_param"] <= 12.5
    # the tiny --quick set has no default-path goal (that needs >= 10M parameters)
    assert len(goals) == 3 and all(g["goal"].startswith("gpt2 ") for g in goals)
    assert [g["limit"] for g in goals] == [2.0, 0.9, 1.0]


def test_perf_optim_resnet20_shapes(tmp_path, capsys):
    _, cases, goals = run_target("optim", tmp_path, capsys, "--shapes", "resnet20",
                                 "--repeats", "1", "--warmup", "0")
    assert {c["num_params"] for c in cases} == {272_474}
    assert {c["num_tensors"] for c in cases} == {65}
    assert {g["limit"] for g in goals} == {1.3}


def test_perf_optim_subset_keeps_the_baseline(tmp_path, capsys):
    _, cases, goals = run_target("optim", tmp_path, capsys, "--shapes", "gpt2",
                                 "--optimizers", "stac")
    assert [(c["optimizer"], c["variant"]) for c in cases] == [
        ("adamw", "fused"), ("stac", "default"), ("stac", "foreach"), ("stac", "for-loop")]
    assert [g["goal"].split(" (")[0] for g in goals] == ["gpt2 stac step / fused AdamW"]


def test_gpt2_small_has_the_real_shapes():
    with torch.device("meta"):
        model = gpt2_parameters(**GPT2_SMALL)
    params = list(model.parameters())
    assert len(params) == 148 and sum(p.numel() for p in params) == 124_439_808
    assert dict(model.named_parameters())["h.0.attn.c_attn.weight"].shape == (2304, 768)


def test_bytes_per_param_follow_the_table():
    model = gpt2_parameters(n_layer=1, d=8, vocab=16, n_ctx=4)
    assert bytes_per_param(Chimera21(model.parameters()), "chimera21") == 36
    assert bytes_per_param(Chimera21(model.parameters(), psi_storage="int8"), "chimera21") == 30
    stac = STAC(model)  # cap = ln_f (16 parameters) at AdamW's 28 bytes, the rest 20
    numel = sum(p.numel() for p in model.parameters())
    assert bytes_per_param(stac, "stac") == pytest.approx((20 * (numel - 16) + 28 * 16) / numel)


def test_perf_layers(tmp_path, capsys):
    text, cases, goals = run_target("layers", tmp_path, capsys)
    layers = [(c["case"], c["layer"], c["quant"], c["path"], c["batch"]) for c in cases]
    train = [("nn.Linear", "fp32", "-"), ("BitLinear", "chimera", "default"),
             ("BitLinear", "chimera", "eager"), ("BitLinear", "strict_bitnet", "default")]
    evals = [("MLP", "fp32", "default"), ("MLP", "chimera", "default"),
             ("packed MLP", "base3", "default")]
    assert layers == [("train", *t, b) for b in (8, 1) for t in train] + [
        ("eval", *e, b) for b in (2, 3) for e in evals] + [
        ("resnet20", "ResNet20", "fp32", "-", 2),
        ("resnet20", "ChimeraResNet20", "chimera", "default", 2)]
    floats = [c["time_ratio"] for c in cases if c["quant"] == "fp32"]
    assert floats == [1.0] * 5  # every case and batch has its own float reference
    assert [g["goal"].split(" ")[0] for g in goals] == [
        "BitLinear", "BitLinear", "ternarized", "ternarized", "packed", "chimera"]
    assert [g["op"] for g in goals] == ["<="] * 4 + [">=", "<="]
    packed = next(g for g in goals if g["goal"].startswith("packed"))
    row = next(c for c in cases if c["layer"] == "packed MLP" and c["batch"] == 2)
    assert packed["value"] == row["throughput_ratio"]


def test_perf_layers_runs_a_subset_of_cases(tmp_path, capsys):
    _, cases, goals = run_target("layers", tmp_path, capsys, "--cases", "eval")
    assert {c["case"] for c in cases} == {"eval"} and len(goals) == 3


def test_perf_rules(tmp_path, capsys):
    text, cases, goals = run_target("rules", tmp_path, capsys)
    assert [c["rule"] for c in cases] == ["backprop", "dfa", "state_bridge", "credit_bridge"]
    assert cases[0]["ratio_vs_backprop"] == 1.0
    for c in cases[2:]:  # the bridges spend time on their credits and feedback nets
        assert c["credits_ms"] > 0 and c["train_feedback_ms"] > 0
    assert len(goals) == 3 and "feedback training ms" in text


def test_profile_option_records_top_ops(tmp_path, capsys):
    _, cases, _ = run_target("rules", tmp_path, capsys, "--profile")
    assert all(c["top_ops"] and c["top_ops"][0]["ms"] >= 0 for c in cases)


@pytest.mark.parametrize(("argv", "message"), [
    (["optim", "--shapes", "vit"], "--shapes must be one of gpt2, resnet20, both"),
    (["optim", "--repeats", "0"], "--repeats must be >= 1"),
    (["optim", "--optimizers", "adam"],
     "--optimizers must be a comma-separated subset of adamw, chimera21"),
    (["layers", "--warmup", "-1"], "--warmup must be >= 0"),
    (["layers", "--resnet-batch", "0"], "--resnet-batch must be >= 1"),
    (["layers", "--cases", "train,gpu"], "--cases must be a comma-separated subset of train"),
    (["rules", "--d-hidden", "0"], "--d-hidden must be >= 1"),
    (["rules", "--threads", "0"], "--threads must be >= 1"),
    (["optim", "--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
])
def test_bad_arguments_are_clear_errors(argv, message, tmp_path, capsys):
    assert main(["perf", *argv, "--quick", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["perf", "rules", "--device", "cuda", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_time_cases_runs_setups_before_every_call_and_reports_the_first():
    calls = []
    (t,) = time_cases([lambda: calls.append("fn")], "cpu", warmup=2, repeats=3,
                      setups=[lambda: calls.append("setup")])
    assert calls == ["setup", "fn"] * 5
    assert set(t) == {"median_s", "min_s", "max_s", "first_s"}
    assert 0 <= t["min_s"] <= t["median_s"] <= t["max_s"]
    assert milliseconds(t) == {"median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3,
                               "max_ms": t["max_s"] * 1e3}


def test_time_cases_interleaves_rounds():
    calls = []
    out = time_cases([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", warmup=1,
                     repeats=2, setups=[None, lambda: calls.append("setup b")])
    assert calls == ["a", "setup b", "b"] * 3 and len(out) == 2
    with pytest.raises(ValueError, match=r"setups must have one entry per case \(1\), got 0"):
        time_cases([lambda: None], "cpu", setups=[])


@pytest.mark.parametrize(("warmup", "repeats", "message"), [
    (-1, 3, "warmup must be an integer >= 0, got -1"), (0, 0, "repeats must be an integer >= 1"),
    (True, 3, "warmup must be"), (1, 2.5, "repeats must be"),
])
def test_time_cases_rejects_bad_counts(warmup, repeats, message):
    with pytest.raises(ValueError, match=message):
        time_cases([lambda: None], "cpu", warmup=warmup, repeats=repeats)


def test_top_ops_excludes_setup():
    x = torch.randn(64, 64)
    ops = top_ops(lambda: x @ x, torch.device("cpu"), setup=lambda: x.sin(), calls=2)
    names = [o["op"] for o in ops]
    assert "aten::mm" in names and "aten::sin" not in names
    assert next(o for o in ops if o["op"] == "aten::mm")["count"] == 1


def test_goal_verdicts():
    assert goal("a", 1.2, "<=", 1.3)["met"] is True
    assert goal("a", 0.7, ">=", 0.8)["met"] is False
    assert goal("a", None, "<=", 1.0)["met"] is None
