import statistics

import pytest
import torch
import torch.nn.functional as F

from chimera.data.stress_problems import STRESS, make_stress_problem

NAMES = ["regression", "sparse_relu", "noisy_quadratic", "saddle"]


def _first_layer_inputs(problem, calls=1):
    """The x batches the model sees, captured with a forward pre-hook on its first layer."""
    seen = []
    handle = problem.model[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    for _ in range(calls):
        problem.loss()
    handle.remove()
    return torch.cat(seen)


def _quadratic_part(model):
    return sum(0.5 * p.square().mean() for p in model.parameters()).item()


def test_registry_lists_the_spec_problems():
    assert STRESS.names() == NAMES
    with pytest.raises(ValueError, match="unknown stress problem 'nope'"):
        make_stress_problem("nope")


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed_and_leaves_global_rng_alone(name):
    state = torch.get_rng_state()
    a, b = make_stress_problem(name, seed=3), make_stress_problem(name, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    losses_a = [a.loss(step).item() for step in range(4)]
    assert losses_a == [b.loss().item() for _ in range(4)]
    assert len(set(losses_a)) == 4  # a fresh draw each call
    assert torch.equal(torch.get_rng_state(), state)
    c = make_stress_problem(name, seed=4)
    assert c.loss().item() != make_stress_problem(name, seed=3).loss().item()
    assert not torch.equal(next(a.model.parameters()), next(c.model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_model_architecture(name):
    p = make_stress_problem(name, n_in=5, hidden=7)
    lin1, act, lin2 = p.model
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (5, 7, 1)
    assert isinstance(act, torch.nn.ReLU if name == "sparse_relu" else torch.nn.Tanh)
    assert p.name == name and name in repr(p)


@pytest.mark.parametrize("name", NAMES)
def test_adam_reduces_the_loss(name):
    p = make_stress_problem(name, seed=1)
    opt = torch.optim.Adam(p.model.parameters(), lr=3e-3)
    quad_start = _quadratic_part(p.model)
    losses = []
    for step in range(300):
        opt.zero_grad()
        loss = p.loss(step)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        losses.append(loss.item())
    if name == "noisy_quadratic":  # the noise term has mean zero; its expectation must fall
        assert _quadratic_part(p.model) < 0.5 * quad_start
    else:
        assert statistics.fmean(losses[-20:]) < 0.05 * statistics.fmean(losses[:20])


def test_regression_zeroes_every_third_column():
    x = _first_layer_inputs(make_stress_problem("regression", batch=256, n_in=10))
    assert x.shape == (256, 10)
    assert torch.all(x[:, [0, 3, 6, 9]] == 0)
    assert torch.all(x[:, [1, 2, 4, 5, 7, 8]] != 0)
    assert abs(x[:, 1].std().item() - 1) < 0.15  # N(0, 1)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_sparse_relu_inputs_and_bias(sparsity):
    p = make_stress_problem("sparse_relu", batch=4096, sparsity=sparsity)
    assert torch.all(p.model[0].bias == -0.75)
    x = _first_layer_inputs(p)
    assert torch.all(x >= 0)
    # nonzero iff the normal draw is positive (1/2) and the mask survives (1 - sparsity)
    assert (x > 0).float().mean().item() == pytest.approx(0.5 * (1 - sparsity), abs=0.01)


def _replay_regression_loss(problem, seed, noise_scale, sparse=False, n_in=32, batch=64):
    """The documented equation recomputed from a generator in the same state as the problem's."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(n_in, 1, generator=gen)
    x = torch.randn(batch, n_in, generator=gen)
    if sparse:
        x = torch.relu(x) * (torch.rand(batch, n_in, generator=gen) > 0.5)
    else:
        x[:, ::3] = 0
    y = x @ w_true + 0.05 * noise_scale * torch.randn(batch, 1, generator=gen)
    return F.mse_loss(problem.model(x), y)


@pytest.mark.parametrize("sparse", [False, True])
def test_teacher_loss_matches_spec_equation(sparse):
    name = "sparse_relu" if sparse else "regression"
    p = make_stress_problem(name, seed=5, noise_scale=2.0)
    expected = _replay_regression_loss(p, 5, 2.0, sparse=sparse)
    assert torch.allclose(p.loss(), expected)


def test_noisy_quadratic_matches_spec_equation():
    p = make_stress_problem("noisy_quadratic", seed=2, noise_scale=0.5)
    gen = torch.Generator().manual_seed(2)
    expected = sum(
        0.5 * q.square().mean() + (q * 0.5 * torch.randn(q.shape, generator=gen)).mean()
        for q in p.model.parameters()
    )
    assert torch.allclose(p.loss(), expected)
    quiet = make_stress_problem("noisy_quadratic", seed=2, noise_scale=0.0)
    assert quiet.loss().item() == pytest.approx(_quadratic_part(quiet.model))


def test_saddle_is_regression_plus_quartic_penalty():
    saddle, regression = make_stress_problem("saddle"), make_stress_problem("regression")
    penalty = 0.01 * sum((q**4 - q**2).mean() for q in saddle.model.parameters())
    assert torch.allclose(saddle.loss(), regression.loss() + penalty)


def test_gradients_reach_the_model():
    p = make_stress_problem("regression")
    p.loss().backward()
    grad = p.model[0].weight.grad
    assert torch.all(grad[:, ::3] == 0) and grad[:, 1].abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": 0}, "batch"),
        ({"n_in": -1}, "n_in"),
        ({"hidden": 0}, "hidden"),
        ({"noise_scale": -0.1}, "noise_scale"),
        ({"noise_scale": float("nan")}, "noise_scale"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"batch": True}, "batch must be an integer >= 1, got True"),
        ({"noise_scale": True}, "noise_scale must be a number >= 0, got True"),
    ],
)
def test_rejects_impossible_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_stress_problem("regression", **kwargs)
