import math

import pytest
import torch

from chimera.bench.jobs.toy_lq import DEFAULT_W_STD, run_toy_lq
from chimera.bench.report.tables import toy_lq_table
from chimera.data.toy_lq_problem import make_toy_lq, toy_lq_loss
from chimera.rules import exact_costates
from chimera.rules.learning_rule import residual_states
from chimera.run.records import RecordWriter, read_records


def test_problem_is_seeded_and_sized_as_spec():
    p = make_toy_lq(3)
    assert p.weights.shape == (12, 64, 64) and p.readout.shape == (10, 64)
    assert p.teacher.shape == (10, 64)
    assert torch.equal(p.weights, make_toy_lq(3).weights)
    assert not torch.equal(p.weights, make_toy_lq(4).weights)
    assert p.weights.std().item() == pytest.approx(0.03 / math.sqrt(64), rel=0.05)
    x, target = p.sample(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(target, x @ p.teacher.T)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        make_toy_lq(dim=0)


def test_model_is_the_linear_residual_net_and_transfer_maps_to_h_last():
    p = make_toy_lq(0, dim=8, num_layers=3, out_dim=2, w_std=0.5)
    model = p.model()
    assert not any(q.requires_grad for q in model.parameters())
    x, _ = p.sample(4)
    hs = residual_states(model, x)
    torch.testing.assert_close(hs[1], x + x @ p.weights[0].T)
    for l, h in enumerate(hs):
        torch.testing.assert_close(h @ p.transfer(l).T, hs[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), hs[-1] @ p.readout.T)


def test_closed_form_costates_match_autograd():
    p = make_toy_lq(1, dim=16, num_layers=4, out_dim=3, w_std=0.5)
    x, target = p.sample(6)
    closed = p.costates(x, target)
    auto = exact_costates(p.model(), x, target, toy_lq_loss)
    assert len(closed) == 5
    for a, b in zip(closed, auto, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_short_run_orders_the_rules_and_prints_the_table(tmp_path):
    with RecordWriter(tmp_path / "toy.jsonl") as w:
        finals = run_toy_lq(["dfa", "state_bridge", "credit_bridge"], seeds=[0], steps=60,
                            writer=w, progress=False)
    by = {f["variant"]: f for f in finals}
    assert abs(by["dfa"]["costate_cosine"]) < 0.1
    # above broadcasting the exact terminal costate (0.78 at the default w_std 0.3)
    assert by["state_bridge"]["costate_cosine"] > 0.85 > by["state_bridge"][
        "terminal_broadcast_cosine"]
    assert by["credit_bridge"]["costate_cosine"] > 0.2  # learning; far from converged
    assert by["state_bridge"]["nudging"] < -0.2 < by["dfa"]["nudging"]
    assert {f["w_std"] for f in finals} == {DEFAULT_W_STD}
    records = read_records(tmp_path / "toy.jsonl")
    assert {r["record_type"] for r in records} == {"step", "final"}
    assert sum(r["record_type"] == "final" for r in records) == 3
    table = toy_lq_table(finals)
    assert "| state_bridge" in table and "costate cosine" in table
    assert "reference: a_l = λ_L" in table


def test_worker_processes_append_whole_records_to_one_file(tmp_path):
    with RecordWriter(tmp_path / "toy.jsonl") as w:
        finals = run_toy_lq(["dfa"], seeds=[0, 1], steps=5, writer=w, progress=False,
                            w_std=0.03, workers=2)
    assert [f["seed"] for f in finals] == [0, 1]
    records = read_records(tmp_path / "toy.jsonl")
    assert sorted(r["seed"] for r in records if r["record_type"] == "final") == [0, 1]
    assert sum(r["record_type"] == "step" for r in records) == 2 * 5
    assert {r["w_std"] for r in records} == {0.03}


def test_unknown_variant_and_bad_steps():
    with pytest.raises(ValueError, match="unknown toy LQ variant 'fa'"):
        run_toy_lq(["fa"], seeds=[0], steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run_toy_lq(["dfa"], seeds=[0], steps=0, progress=False)
    with pytest.raises(ValueError, match="w_std must be a number >= 0"):
        run_toy_lq(["dfa"], seeds=[0], steps=1, progress=False, w_std=-1.0)
