import copy

import pytest
import torch
import torch.nn.functional as F

from chimera.models.resmlp import ResMLP
from chimera.rules import (
    build_rule,
    costate_cosine,
    credit_diagnostics,
    exact_costates,
    nudging,
    perturbation_rho,
)
from chimera.rules.learning_rule import residual_states


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ResMLP((10,), 4, d_hidden=24, num_blocks=3)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(32, 10, generator=g), torch.randint(0, 4, (32,), generator=g)
    return model, x, c, exact_costates(model, x, c, F.cross_entropy)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_exact_costates_are_autograd_gradients_and_leave_grads_alone(setup):
    model, x, c, lam = setup
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        hs = residual_states(model, x)
    for l, h in enumerate(hs):  # finite difference along a random direction
        d = torch.randn(h.shape, generator=gen(l), dtype=torch.float64)
        model64 = copy.deepcopy(model).double()
        h64 = h.double()
        with torch.no_grad():
            def loss(t, h64=h64, l=l, d=d, model64=model64):
                hh = h64 + t * d
                for block in list(model64.blocks)[l:]:
                    hh = hh + block(hh)
                return F.cross_entropy(model64.head(hh), c)
            fd = (loss(1e-5) - loss(-1e-5)) / 2e-5
        torch.testing.assert_close((lam[l].double() * d).sum(), fd, rtol=1e-3, atol=1e-6)


def test_exact_costates_give_cosine_one_and_rho_one(setup):
    model, x, c, lam = setup
    assert costate_cosine(lam, lam) == pytest.approx(1.0, abs=1e-6)
    assert perturbation_rho(model, x, c, lam, F.cross_entropy, generator=gen()) > 0.99
    assert nudging(model, x, c, lam, F.cross_entropy) < -0.05


def test_random_credits_score_about_zero_and_negated_costates_minus_one(setup):
    model, x, c, lam = setup
    rand = [torch.randn(a.shape, generator=gen(i)) for i, a in enumerate(lam)]
    assert abs(costate_cosine(rand, lam)) < 0.1
    assert abs(perturbation_rho(model, x, c, rand, F.cross_entropy, generator=gen())) < 0.1
    assert abs(nudging(model, x, c, rand, F.cross_entropy)) < 0.05
    neg = [-a for a in lam]
    assert costate_cosine(neg, lam) == pytest.approx(-1.0, abs=1e-6)
    assert perturbation_rho(model, x, c, neg, F.cross_entropy, generator=gen()) < -0.99
    assert nudging(model, x, c, neg, F.cross_entropy) > 0.05


def test_per_example_scale_of_a_credit_does_not_count(setup):
    model, x, c, lam = setup
    scale = torch.rand(len(x), 1, generator=gen()) * 100 + 0.01
    scaled = [a * scale for a in lam]
    assert costate_cosine(scaled, lam) == pytest.approx(1.0, abs=1e-6)
    rho = perturbation_rho(model, x, c, lam, F.cross_entropy, generator=gen())
    assert perturbation_rho(model, x, c, scaled, F.cross_entropy, generator=gen()) == \
        pytest.approx(rho, abs=1e-6)
    assert nudging(model, x, c, scaled, F.cross_entropy) == \
        pytest.approx(nudging(model, x, c, lam, F.cross_entropy), rel=1e-3)  # up to the 1e-6


def test_nudging_is_the_mean_relative_loss_change(setup):
    model, x, c, lam = setup
    credits = [torch.zeros_like(a) for a in lam]
    credits[-1] = lam[-1]
    with torch.no_grad():
        h_last = residual_states(model, x)[-1]
        base = F.cross_entropy(model.head(h_last), c)
        a_norm = lam[-1] / (lam[-1].pow(2).mean(1, keepdim=True).sqrt() + 1e-6)
        moved = F.cross_entropy(model.head(h_last - 0.3 * a_norm), c)
    expected = float((moved - base) / base) / len(lam)  # zero credits leave the other layers
    assert nudging(model, x, c, credits, F.cross_entropy, eta=0.3) == pytest.approx(expected,
                                                                                    rel=1e-4)


def test_shape_mismatches_are_errors(setup):
    model, x, c, lam = setup
    with pytest.raises(ValueError, match="one tensor per state h_0..h_L \\(4\\), got 3"):
        costate_cosine(lam[:3], lam)
    with pytest.raises(ValueError, match="credit a_1 has shape \\(32, 5\\)"):
        nudging(model, x, c, [lam[0], lam[1][:, :5], *lam[2:]], F.cross_entropy)
    with pytest.raises(ValueError, match="num_perturbations must be an integer >= 2, got 1"):
        perturbation_rho(model, x, c, lam, F.cross_entropy, num_perturbations=1)


@pytest.mark.parametrize(("name", "low", "high"), [("backprop", 0.999, 1.0),
                                                    ("dfa", -0.2, 0.2)])
def test_credit_diagnostics_of_rules(setup, name, low, high):
    model, x, c, _ = setup
    model.train()
    state = copy.deepcopy(model.state_dict())
    rule = build_rule(name, model, None, loss_fn=F.cross_entropy, out_dim=4, total_steps=1)
    diag = credit_diagnostics(rule, x, c, generator=gen())
    assert low <= diag["costate_cosine"] <= high
    assert len(diag["costate_cosine_per_layer"]) == 4 and diag["bridge_residual"] is None
    assert (diag["perturbation_rho"] > 0.99) == (name == "backprop")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), float("inf")])
def test_perturbation_scale_and_nudging_eta_must_be_finite_and_positive(setup, value):
    model, x, c, lam = setup
    with pytest.raises(ValueError, match=r"^scale must be a (finite )?number > 0, got "):
        perturbation_rho(model, x, c, lam, F.cross_entropy, scale=value)
    with pytest.raises(ValueError, match=r"^eta must be a (finite )?number > 0, got "):
        nudging(model, x, c, lam, F.cross_entropy, eta=value)
