"""FA, DFA and sign symmetry on any model (rules/feedback.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chimera.cli import main
from chimera.models import build_model
from chimera.models.resmlp import ResMLP
from chimera.nn.quantize import ternarize
from chimera.rules import FeedbackRule, LayerDFA, alignment_angle, build_rule
from chimera.rules.dfa import DFA
from chimera.rules.feedback import forward_weight
from chimera.run.checkpoint import load_checkpoint
from chimera.run.spec import RunSpec
from chimera.run.trainer import train

FEEDBACK = ("fa", "usf", "brsf", "frsf", "dfa")
SHAPES = {"mlp": (16,), "cnn": (1, 16), "resnet20": (3, 8, 8)}


def make(name, model, lr=0.05, loss_fn=F.cross_entropy, out_dim=4):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return build_rule(name, model, opt, loss_fn=loss_fn, out_dim=out_dim, total_steps=2)


@pytest.mark.parametrize("model_name", SHAPES)
@pytest.mark.parametrize("name", FEEDBACK)
def test_every_rule_trains_mlp_cnn_and_resnet20(name, model_name):
    torch.manual_seed(0)
    model = build_model(model_name, SHAPES[model_name], 4)
    rule = make(name, model)
    assert isinstance(rule, FeedbackRule)
    before = [p.detach().clone() for p in model.parameters()]
    x, c = torch.randn(6, *SHAPES[model_name]), torch.randint(0, 4, (6,))
    for _ in range(2):
        out = rule.train_step(x, c)
    assert math.isfinite(out["loss"]) and out["logits"].shape == (6, 4)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_ternary_layers_train_with_feedback():
    torch.manual_seed(0)
    model = ternarize(build_model("mlp", (16,), 4), "chimera", skip=())
    rule = make("fa", model)
    before = [forward_weight(m).detach().clone() for m in rule.layers.values()]
    rule.train_step(torch.randn(6, 16), torch.randint(0, 4, (6,)))
    after = [forward_weight(m) for m in rule.layers.values()]
    assert len(before) == 3
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def _input_grad(name: str, w2: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient reaching the second layer's input when ℓ = <y, g> (so e = g whatever W2 is)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    with torch.no_grad():
        model[2].weight.copy_(w2)
    seen = {}
    model[2].register_forward_pre_hook(lambda m, a: seen.update(h=a[0]) or a[0].retain_grad())
    torch.manual_seed(1)
    rule = make(name, model, lr=0.0, loss_fn=lambda y, c: (y * g).sum(), out_dim=3)
    rule.train_step(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    return seen["h"].grad


@pytest.mark.parametrize("name", ["fa", "frsf", "usf", "brsf", "dfa"])
def test_forward_weights_never_enter_the_gradient_at_a_layer_input(name):
    g = torch.randn(4, 3)
    w2 = torch.randn(3, 7)
    scaled = w2 * torch.rand(3, 7) * 5  # another W2: same signs, other magnitudes
    grad = _input_grad(name, w2, g)
    other = _input_grad(name, scaled, g)
    if name == "brsf":  # fresh magnitudes every step; the same draw here (same seed)
        assert torch.equal(grad, other)
    else:
        assert torch.allclose(grad, other)
    assert not torch.allclose(grad, g @ w2, atol=1e-3)  # not backprop's W2ᵀ g
    if name == "usf":  # B = sign(W2)·sqrt(2 / (7 + 3))
        assert torch.allclose(grad, g @ (w2.sign() * math.sqrt(0.2)), atol=1e-6)


def test_fa_gradient_is_the_fixed_feedback_matrix_times_the_output_error():
    g, w2 = torch.randn(4, 3), torch.randn(3, 7)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    torch.manual_seed(1)
    rule = make("fa", model, lr=0.0, loss_fn=lambda y, c: (y * g).sum(), out_dim=3)
    with torch.no_grad():
        model[2].weight.copy_(w2)
    x = torch.randn(4, 5)
    rule.train_step(x, torch.zeros(4, dtype=torch.long))
    delta1 = (g @ rule.feedback["2"]) * (model[0](x) > 0)
    assert torch.allclose(model[0].weight.grad, delta1.T @ x, atol=1e-5)
    assert torch.allclose(model[2].weight.grad, g.T @ torch.relu(model[0](x)), atol=1e-5)


def test_dfa_projects_the_output_error_to_every_hidden_layer_input():
    g = torch.randn(4, 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    rule = make("dfa", model, lr=0.0, loss_fn=lambda y, c: (y * g).sum(), out_dim=3)
    x = torch.randn(4, 5)
    rule.train_step(x, torch.zeros(4, dtype=torch.long))
    assert set(rule.feedback) == {"2", "4"}  # the first layer's input carries no gradient
    assert rule.feedback["2"].shape == (7, 3)
    delta1 = (g @ rule.feedback["2"].T) * (model[0](x) > 0)
    assert torch.allclose(model[0].weight.grad, delta1.T @ x, atol=1e-5)


def test_dfa_picks_block_credits_on_residual_models_and_layers_elsewhere():
    resmlp = ResMLP((12,), 5, d_hidden=16, num_blocks=2)
    assert type(build_rule("dfa", resmlp, None, loss_fn=F.cross_entropy, out_dim=5,
                           total_steps=1)) is DFA
    mlp = build_model("mlp", (12,), 5)
    assert type(build_rule("dfa", mlp, None, loss_fn=F.cross_entropy, out_dim=5,
                           total_steps=1)) is LayerDFA


def test_alignment_angle_on_hand_examples():
    assert alignment_angle(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(90)
    assert alignment_angle(torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 0.0]])) \
        == pytest.approx(45)
    assert alignment_angle(torch.ones(3), -torch.ones(3)) == pytest.approx(180)
    rule = make("usf", build_model("mlp", (16,), 4))
    assert all(0 < a < 90 for a in rule.alignment_angles().values())


def test_state_round_trip_and_errors():
    rule = make("frsf", build_model("mlp", (16,), 4))
    other = make("frsf", build_model("mlp", (16,), 4))
    other.load_state_dict(rule.state_dict())
    assert all(torch.equal(rule.feedback[k], other.feedback[k]) for k in rule.feedback)
    with pytest.raises(ValueError, match="rule state of 'fa' cannot be loaded into rule 'frsf'"):
        other.load_state_dict(make("fa", build_model("mlp", (16,), 4)).state_dict())
    with pytest.raises(ValueError, match="needs Linear/Conv layers; Sequential has none"):
        make("fa", nn.Sequential(nn.LayerNorm(3)))
    with pytest.raises(ValueError, match=r"x of shape \(2, 7\) does not fit the model: "):
        rule.train_step(torch.randn(2, 7), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no credits per residual state"):
        rule.credits(torch.randn(2, 16), torch.zeros(2, dtype=torch.long))


def test_cli_trains_an_mlp_with_fa_and_records_alignment(tmp_path):
    main(["train", "--task", "digits", "--model", "mlp", "--rule", "fa", "--epochs", "1",
          "--max-batches", "2", "--quiet", "--out", str(tmp_path / "runs.jsonl")])
    records = (tmp_path / "runs.jsonl").read_text()
    assert '"rule": "fa"' in records
    assert '"feedback_angle_per_layer"' in records


def test_checkpoint_keeps_the_rule_state(tmp_path):
    spec = RunSpec("digits", "cnn", "adamw", epochs=1, batch_size=64, rule="frsf", max_batches=2)
    ckpt = tmp_path / "c.pt"
    train(spec, progress=False, checkpoint=ckpt)
    state = load_checkpoint(ckpt)["callbacks"]["rule"]
    assert state["rule"] == "frsf" and state["step_count"] == 2
    assert len(state["feedback"]) == 4  # three convolutions and the linear head
    rule = make("frsf", build_model("cnn", (64,), 10))
    rule.load_state_dict(state)
    assert all(torch.equal(rule.feedback[k], v) for k, v in state["feedback"].items())
