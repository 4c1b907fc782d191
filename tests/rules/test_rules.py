import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from chimera.models.resmlp import ResMLP
from chimera.nn.bit_layers import BitLinear
from chimera.nn.quantize import ternarize
from chimera.optim import build_optimizer
from chimera.rules import RULES, build_rule, normalize_credit
from chimera.rules.credit_bridge import soft_min
from chimera.rules.learning_rule import normalised_sq_error, residual_states

NON_BP = ("dfa", "state_bridge", "credit_bridge")
SMALL = {"bridge_hidden": 32}


def tiny_model(seed: int = 0) -> ResMLP:
    torch.manual_seed(seed)
    return ResMLP((12,), 5, d_hidden=16, num_blocks=3)


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def make_rule(name, model, optimizer="adamw", total_steps=10, **hparams):
    opt = build_optimizer(optimizer, model, lr=1e-3) if isinstance(optimizer, str) else optimizer
    hp = {**(SMALL if name in ("state_bridge", "credit_bridge") else {}), **hparams}
    return build_rule(name, model, opt, loss_fn=F.cross_entropy, out_dim=5,
                      total_steps=total_steps, **hp)


# -- interface --------------------------------------------------------------------------------
def test_registry_and_unknown_names():
    assert sorted(RULES.names()) == ["backprop", "brsf", "credit_bridge", "dfa", "fa", "frsf",
                                     "state_bridge", "usf"]
    with pytest.raises(ValueError, match="unknown learning rule 'hebb'; known: backprop"):
        make_rule("hebb", tiny_model())
    with pytest.raises(ValueError, match="no hyper-parameter 'lam'; allowed: sigma_bridge"):
        make_rule("state_bridge", tiny_model(), lam=0.1)
    with pytest.raises(ValueError, match="no hyper-parameter 'K'; allowed: none"):
        make_rule("dfa", tiny_model(), K=2)
    with pytest.raises(ValueError, match="preset must be one of toy, classification"):
        make_rule("dfa", tiny_model(), preset="cifar")


@pytest.mark.parametrize(("hparam", "value"), [
    ("K", 0), ("K", 2.5), ("lam", 0.0), ("ema_momentum", 1.5), ("warmup_frac", -0.1),
    ("sigma_bridge", -1.0), ("emb_dim", 7), ("term_grad_weight", True),
])
def test_bad_hyper_parameters(hparam, value):
    with pytest.raises(ValueError, match=hparam):
        make_rule("credit_bridge", tiny_model(), **{hparam: value})


@pytest.mark.parametrize("hparam", ["sigma_bridge", "lam", "K", "term_grad_weight",
                                    "slope_weight", "ema_momentum", "lr_fb", "warmup_frac",
                                    "bridge_hidden", "emb_dim"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_hyper_parameters_are_rejected_by_name(hparam, value):
    with pytest.raises(ValueError, match=rf"^{hparam} must be (a|an) ") as err:
        make_rule("credit_bridge", tiny_model(), **{hparam: value})
    assert "\n" not in str(err.value)


def test_presets_follow_spec():
    toy = make_rule("credit_bridge", tiny_model(), preset="toy").hparams
    cls = make_rule("credit_bridge", tiny_model(), bridge_hidden=512).hparams
    assert (toy["sigma_bridge"], toy["K"], cls["sigma_bridge"], cls["K"]) == (0.1, 8, 0.05, 4)
    for hp in (toy, cls):
        assert (hp["lam"], hp["ema_momentum"], hp["lr_fb"]) == (0.1, 0.995, 1e-3)
    assert (toy["term_grad_weight"], cls["term_grad_weight"]) == (1.0, 100.0)
    assert cls["warmup_frac"] == 0.2


def test_model_without_residual_parts_is_rejected():
    with pytest.raises(ValueError, match="Sequential has no stem, blocks, head"):
        make_rule("state_bridge", nn.Sequential(nn.Linear(12, 5)))
    model = tiny_model()
    del model.head
    with pytest.raises(ValueError, match="ResMLP has no head$"):
        make_rule("credit_bridge", model)


RESIDUAL_RULES = [n for n in RULES.names() if RULES.get(n).residual]  # credits per block


@pytest.mark.parametrize("name", RESIDUAL_RULES)
def test_bad_batches(name):
    rule = make_rule(name, tiny_model())
    x, c = batch()
    with pytest.raises(ValueError, match=r"x of shape \(8, 7\) does not fit the model's stem"):
        rule.train_step(torch.randn(8, 7), c)
    with pytest.raises(ValueError, match="same batch size, got 8 and 7"):
        rule.train_step(x, c[:7])
    with pytest.raises(ValueError, match=r"values in \[0, out_dim=5\)"):
        rule.credits(x, c + 5)
    with pytest.raises(ValueError, match=r"shape \(batch, out_dim=5\)"):
        rule.credits(x, torch.randn(8, 4))


def test_head_must_output_out_dim_and_sizes_are_checked():
    rule = build_rule("dfa", tiny_model(), None, loss_fn=F.cross_entropy, out_dim=6,
                      total_steps=1)
    with pytest.raises(ValueError, match=r"head outputs shape \(8, 5\).*out_dim is 6"):
        rule.credits(*batch())
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1, got 0"):
        build_rule("dfa", tiny_model(), None, loss_fn=F.cross_entropy, out_dim=5, total_steps=0)
    with pytest.raises(ValueError, match="use train_feedback"):
        rule.train_step(*batch())


@pytest.mark.parametrize("name", RULES.names())
def test_train_step_returns_loss_and_detached_logits(name):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    out = make_rule(name, model).train_step(*batch())
    assert isinstance(out["loss"], float) and out["loss"] > 0
    assert out["logits"].shape == (8, 5) and not out["logits"].requires_grad
    assert ("bridge_residual" in out) == (name in ("state_bridge", "credit_bridge"))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(before)  # stem, every block and the head were updated


# -- no hidden backprop -----------------------------------------------------------------------
@pytest.mark.parametrize("name", NON_BP)
def test_every_block_and_the_head_read_a_detached_state(name):
    model = tiny_model()
    rule = make_rule(name, model)
    attached = []

    def hook(module, args):
        if torch.is_grad_enabled():
            attached.append(args[0].grad_fn is not None)

    modules = [*model.blocks, model.head]
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    rule.train_step(*batch())
    for h in handles:
        h.remove()
    assert len(attached) >= len(modules) and not any(attached)


@pytest.mark.parametrize("name", NON_BP)
def test_gradients_equal_isolated_local_losses(name):
    """Block l's gradient is that of mean <a_norm_{l+1}, f_l(h_l)> alone
    (docs/algorithms.md#setting); the stem's
    uses a_0 and the head's is the exact loss gradient on a detached h_L."""
    model = tiny_model()
    x, c = batch()
    hp = {} if name == "dfa" else {"lr_fb": 0.0, "warmup_frac": 0.0}
    rule = make_rule(name, model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), **hp)
    rule.train_step(x, c)
    credits = rule.credits(x, c)  # nothing moved (lr 0): the credits of that step
    with torch.no_grad():
        hs = residual_states(model, x)
    parts = [(model.stem, x, credits[0])]
    parts += [(b, hs[l], credits[l + 1]) for l, b in enumerate(model.blocks)]
    for module, inp, a in parts:
        clone = copy.deepcopy(module)
        local = (normalize_credit(a) * clone(inp)).sum(1).mean()
        expected = torch.autograd.grad(local, list(clone.parameters()))
        for p, g in zip(module.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g)
    head = copy.deepcopy(model.head)
    expected = torch.autograd.grad(F.cross_entropy(head(hs[-1]), c), list(head.parameters()))
    for p, g in zip(model.head.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_backprop_is_end_to_end_backprop():
    model = tiny_model()
    x, c = batch()
    make_rule("backprop", model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0)) \
        .train_step(x, c)
    clone = copy.deepcopy(model)
    expected = torch.autograd.grad(F.cross_entropy(clone(x), c), list(clone.parameters()))
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)


# -- credits ----------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 9), st.floats(1e-3, 1e3))
def test_normalize_credit_is_a_over_rms_plus_eps_per_example(n, d, scale):
    gen = torch.Generator().manual_seed(d)
    a = torch.randn(n, d, 2, dtype=torch.float64, generator=gen) * scale
    rms = a.pow(2).mean((1, 2)).sqrt()
    torch.testing.assert_close(normalize_credit(a), a / (rms[:, None, None] + 1e-6))
    unit = normalize_credit(a).flatten(1).pow(2).mean(1).sqrt()
    assert torch.all((unit <= 1 + 1e-12) & (unit > 1 - 1e-6 / rms - 1e-12))


def test_dfa_credit_is_fixed_random_projection_of_output_error():
    model = tiny_model()
    x, c = batch()
    rule = make_rule("dfa", model)
    credits = rule.credits(x, c)
    e = (F.softmax(model(x), 1) - F.one_hot(c, 5)) / len(x)
    b = rule.direct_feedback.B
    assert b.shape == (4, 16, 5)
    for l, a in enumerate(credits):
        torch.testing.assert_close(a, e @ b[l].T)


def test_dfa_feedback_entries_have_std_one_over_sqrt_m():
    model = ResMLP((4,), 100, d_hidden=200, num_blocks=1)
    rule = build_rule("dfa", model, None, loss_fn=F.cross_entropy, out_dim=100, total_steps=1)
    rule.credits(torch.randn(2, 4), torch.tensor([0, 1]))
    assert abs(rule.direct_feedback.B.std().item() - 0.1) < 0.005


def test_state_bridge_credit_is_vjp_through_g():
    model = tiny_model()
    x, c = batch()
    rule = make_rule("state_bridge", model, warmup_frac=0.0)
    rule.train_step(x, c)  # move G off the identity
    credits = rule.credits(x, c)
    with torch.no_grad():
        hs = residual_states(model, x)
    h_last = hs[-1].clone().requires_grad_(True)
    g_last = torch.autograd.grad(F.cross_entropy(model.head(h_last), c), h_last)[0]
    for l, h in enumerate(hs):
        h = h.clone().requires_grad_(True)
        out = rule.bridge(h, torch.full((len(h),), l))
        torch.testing.assert_close(credits[l], torch.autograd.grad(out, h, g_last)[0])


def test_credit_bridge_credit_is_value_gradient():
    model = tiny_model()
    x, c = batch()
    rule = make_rule("credit_bridge", model, warmup_frac=0.0)
    credits = rule.credits(x, c)
    with torch.no_grad():
        hs = residual_states(model, x)
    for l, h in enumerate(hs):
        h = h.clone().requires_grad_(True)
        v = rule.value_net(h, torch.full((len(h),), l), F.one_hot(c, 5).float())
        torch.testing.assert_close(credits[l], torch.autograd.grad(v.sum(), h)[0])


def test_normalised_sq_error_is_spec_formula():
    pred = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.5, 1.0]])
    # ||G − t||² / max(||t||, 1)²: 9 / 1, 4 / 4, 0.25 / 1.25
    expected = (9.0 + 1.0 + 0.25 / 1.25) / 3
    assert normalised_sq_error(pred, target).item() == pytest.approx(expected)
    assert normalised_sq_error(torch.tensor([2.0]), torch.tensor([4.0])).item() == \
        pytest.approx(4.0 / 16.0)


def test_soft_min():
    v = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    torch.testing.assert_close(soft_min(v, 1e-3), torch.tensor([1.0, 3.0]), atol=2e-3, rtol=0)
    torch.testing.assert_close(soft_min(v, 1e4), v.mean(1), atol=1e-3, rtol=0)
    expected = -0.5 * torch.log(torch.exp(-v[0] / 0.5).mean())
    torch.testing.assert_close(soft_min(v, 0.5)[0], expected)


@pytest.mark.parametrize("slope_weight", [0.0, 1.0])
def test_consistency_target_without_noise_is_the_ema_value_one_block_on(slope_weight):
    model = tiny_model()
    x, c = batch()
    rule = make_rule("credit_bridge", model, sigma_bridge=0.0, K=3, slope_weight=slope_weight)
    rule.credits(x, c)  # builds the networks
    with torch.no_grad():
        hs = residual_states(model, x)
    ctx = F.one_hot(c, 5).float()
    layer, h_l, ctx_l, target, slope = rule._consistency_target(hs, ctx)
    assert (slope is None) == (slope_weight == 0)
    for i in range(len(x)):
        l = int(layer[i])
        h = h_l[i:i + 1].clone().requires_grad_(True)
        v = rule.value_ema(h + model.blocks[l](h), torch.tensor([l + 1]), ctx_l[i:i + 1])
        torch.testing.assert_close(target[i], v.squeeze().detach())
        if slope is not None:  # (I + J_f)^T ∇V_ema: K equal copies, soft-min weights 1/K
            (g,) = torch.autograd.grad(v.sum(), h)
            torch.testing.assert_close(slope[i], g[0])
    assert layer.max() < len(model.blocks)
    assert all(p.grad is None for p in model.parameters())


def test_warmup_blends_from_dfa_linearly():
    model = tiny_model()
    x, c = batch()
    rule = make_rule("state_bridge", model, total_steps=4, warmup_frac=0.5)
    assert rule.warmup_weight == 0.0
    e = (F.softmax(model(x), 1) - F.one_hot(c, 5)) / len(x)
    for a, d in zip(rule.credits(x, c), rule.direct_feedback(e), strict=True):
        torch.testing.assert_close(a, d)  # t = 0: DFA's credit
    weights = []
    for _ in range(3):
        rule.train_step(x, c)
        weights.append(rule.warmup_weight)
    assert weights == [0.5, 1.0, 1.0]


@pytest.mark.parametrize("name", ("state_bridge", "credit_bridge"))
def test_feedback_training_lowers_the_bridge_residual_and_leaves_the_model(name):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    x, c = batch(32)
    rule = make_rule(name, model, None, lr_fb=3e-3)
    residuals = [rule.train_feedback(x, c)["bridge_residual"] for _ in range(60)]
    assert sum(residuals[-10:]) < 0.5 * sum(residuals[:10])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- ternary layers, optimizers, side effects --------------------------------------------------
@pytest.mark.parametrize("optimizer", ["stac", "chimera21"])
@pytest.mark.parametrize("name", RULES.names())
def test_one_step_on_ternary_resmlp_with_toolkit_optimizers(name, optimizer):
    model = ternarize(tiny_model(), "chimera", skip=("first", "last"))
    weights = [m.weight_master.detach().clone() for m in model.modules()
               if isinstance(m, BitLinear)]
    out = make_rule(name, model, optimizer=optimizer).train_step(*batch())
    assert torch.isfinite(torch.tensor(out["loss"]))
    after = [m.weight_master for m in model.modules() if isinstance(m, BitLinear)]
    assert len(after) == 6 and all(not torch.equal(w, a) for w, a in zip(weights, after,
                                                                         strict=True))


@pytest.mark.parametrize("name", RESIDUAL_RULES)
def test_credits_have_no_side_effects(name):
    model = ternarize(tiny_model(), "chimera", skip=("first", "last"))
    model.train()
    rule = make_rule(name, model)
    x, c = batch()
    rule.train_step(x, c)
    state = copy.deepcopy(model.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    credits = rule.credits(x, c)
    assert len(credits) == 4 and all(a.shape == (8, 16) for a in credits)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
