"""ScaledOptum (docs/algorithms.md#scaledoptum): integer-only ternary training plus sign-SGD."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from chimera.nn.int_ternary import IntTernaryConv1d, IntTernaryLinear
from chimera.optim.scaled_optum import (
    ScaledOptum,
    pressure_increment,
    scaled_optum_state_bytes_per_weight,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids oversubscription on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(IntTernaryLinear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"default_group_size": 0}, "default_group_size"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": 128}, "threshold"),
        ({"threshold": 8.5}, "threshold"),
        ({"ternary_lr": -1.0}, "ternary_lr"),
        ({"ternary_lr": float("inf")}, "ternary_lr"),
        ({"threshold": float("inf")}, "threshold"),
        ({"e_policy": "float"}, "e_policy"),
        ({"momentum_decay": 1.0}, "momentum_decay"),
        ({"momentum_decay": -0.1}, "momentum_decay"),
        ({"momentum_decay": float("nan")}, "momentum_decay"),
    ],
)
def test_invalid_hyper_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ScaledOptum([nn.Parameter(torch.zeros(2))], **kwargs)


def test_add_ternary_modules_checks_type_group_size_and_duplicates():
    opt = ScaledOptum([], default_group_size=32)
    layer = IntTernaryLinear(4, 2)
    with pytest.raises(ValueError, match="integer-ternary"):
        opt.add_ternary_modules([nn.Linear(4, 2)])
    with pytest.raises(ValueError, match="group_size"):
        opt.add_ternary_modules([IntTernaryLinear(4, 2, group_size=16)])
    assert opt.ternary_group is None
    opt.add_ternary_modules([layer, layer])
    opt.add_ternary_modules([layer])
    assert opt.ternary_modules == [layer]
    group = opt.ternary_group
    assert group["params"] == [layer.weight] and group["threshold"] == 64
    assert group["ternary_lr"] == 8.0 and group["lr"] == 1.0  # lr: the schedule's multiplier
    assert sum(1 for g in opt.param_groups if g.get("ternary")) == 1


def test_for_model_registers_modules_and_float_parameters():
    model = nn.Sequential(IntTernaryConv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    model[3].bias.requires_grad_(False)
    opt = ScaledOptum.for_model(model, lr=0.01)
    assert opt.ternary_modules == [model[0]]
    floats = [p for g in opt.param_groups if not g.get("ternary") for p in g["params"]]
    assert [id(p) for p in floats] == [id(model[0].bias), id(model[3].weight)]
    assert opt.ternary_group["params"] == [model[0].weight]
    assert opt.param_groups[0]["lr"] == 0.01


def test_sign_sgd_on_floats_and_params_without_grad_untouched():
    a, b = nn.Parameter(torch.tensor([1.0, -2.0, 0.5])), nn.Parameter(torch.ones(2))
    opt = ScaledOptum([a, b], lr=0.25)
    a.grad = torch.tensor([3.0, -0.001, 0.0])
    opt.step()
    assert a.tolist() == [0.75, -1.75, 0.5] and b.tolist() == [1.0, 1.0]
    assert not opt.state  # sign-SGD keeps no state


def test_sparse_gradient_raises():
    emb = nn.Embedding(5, 2, sparse=True)
    opt = ScaledOptum(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_closure_runs_with_grad_and_its_loss_is_returned():
    model = mlp()
    opt = ScaledOptum.for_model(model, lr=0.01)
    x = torch.randn(4, 8)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and int(model[0].step) == 1


def test_pressure_increment_formula():
    g = torch.tensor([[0.1, -0.2, 0.0, 4.0, -0.05, 0.15]])  # mean |g| = 0.75
    inc = pressure_increment(g, rate=8.0, threshold=5)
    # round(8 * |g| / 0.75) = [1, 2, 0, 43 -> capped 5, 1, 2], sign = -sign(g)
    assert inc.dtype == torch.int16 and inc.tolist() == [[-1, 2, 0, -5, 1, -2]]
    assert pressure_increment(torch.zeros(2, 2), 8.0, 5).tolist() == [[0, 0], [0, 0]]


def test_step_applies_corr_pressure_and_keeps_the_gradient_until_zero_grad():
    model = mlp()
    opt = ScaledOptum.for_model(model, lr=0.01, threshold=3, ternary_lr=2.0)
    layer = model[0]
    t0 = layer.T.clone()
    model(torch.randn(16, 8)).square().mean().backward()
    g = layer.weight_grad
    descent = -torch.sign(g)
    expected_corr = (descent * t0).reshape(16, 1, 8).sum(-1).long()  # fan-in 8 < 32: one group
    inc = pressure_increment(g, 2.0, 3)
    fire = inc.abs() >= 3
    opt.step()
    assert torch.equal(layer.corr_accum, expected_corr) and int(layer.step) == 1
    assert torch.equal(layer.pressure, torch.where(fire, 0, inc).to(torch.int8))
    moved = (t0 + inc.sign()).clamp(-1, 1)
    assert torch.equal(layer.T, torch.where(fire, moved, t0).to(torch.int8))
    assert torch.equal(layer.weight, layer.effective_weight())  # the cache follows the state
    assert torch.equal(layer.weight.grad, g)  # as in torch's optimizers, step keeps .grad
    opt.step()  # a second step without zero_grad applies the same gradient again
    assert int(layer.step) == 2
    opt.zero_grad()
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    bias = layer.bias.detach().clone()
    opt.step()  # no gradient: nothing changes
    assert all(torch.equal(v, buffers[k]) for k, v in layer.named_buffers())
    assert torch.equal(layer.bias, bias)


def test_e_policy_track_rebalances_exponents():
    model = mlp()
    opt = ScaledOptum.for_model(model, lr=0.0, e_policy="track")
    layer = model[0]
    with torch.no_grad():  # pretend the scale has grown to 1.75 * 2^E
        layer.step.fill_(4)
        layer.corr_accum.fill_(4 * 32 * 3 // 4)
    e0 = layer.E.clone()
    train(model, opt, 1)
    assert torch.equal(layer.E, e0 + 1)


def test_state_dict_round_trip_then_identical_continuation():
    model = mlp()
    opt = ScaledOptum.for_model(model, lr=0.01, threshold=4, ternary_lr=2.0)
    train(model, opt, 5)
    model2 = copy.deepcopy(model)
    opt2 = ScaledOptum.for_model(model2, lr=0.5, threshold=100, ternary_lr=9.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.ternary_group["threshold"] == 4 and opt2.param_groups[0]["lr"] == 0.01
    train(model, opt, 5, seed=2)
    train(model2, opt2, 5, seed=2)
    state, state2 = full_state(model), full_state(model2)
    assert all(torch.equal(v, state2[k]) for k, v in state.items())
    assert int(model[0].step) == 10


def test_a_state_with_the_ternary_group_elsewhere_is_rejected():
    model = mlp()
    ternary = ScaledOptum.for_model(model, threshold=4)  # groups: floats, then ternary
    floats = ScaledOptum([{"params": list(ternary.param_groups[0]["params"])},
                          {"params": [model[0].weight]}])  # same parameter counts
    with pytest.raises(ValueError, match=r"^loaded param group 1 lacks e_policy, ternary, "
                                         r"ternary_lr and 1 more: not a ScaledOptum state$"):
        ternary.load_state_dict(floats.state_dict())
    with pytest.raises(ValueError, match=r"^loaded param group 1: ternary must be False \(this "
                                         r"is a float group\), got True$"):
        floats.load_state_dict(ternary.state_dict())
    state = ternary.state_dict()
    state["param_groups"][1]["threshold"] = 200
    with pytest.raises(ValueError, match=r"^loaded param group 1: threshold must be an integer "
                                         r"in \[1, 127\], got 200$"):
        ternary.load_state_dict(state)
    assert ternary.ternary_group["threshold"] == 4


def test_deepcopy_keeps_the_registered_modules_and_continues_identically():
    model = mlp()
    opt = ScaledOptum.for_model(model, lr=0.01, threshold=4, ternary_lr=2.0)
    train(model, opt, 3)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.ternary_modules == [model2[0]] and opt2.default_group_size == 32
    train(model, opt, 3, seed=2)
    train(model2, opt2, 3, seed=2)
    state, state2 = full_state(model), full_state(model2)
    assert all(torch.equal(v, state2[k]) for k, v in state.items())


def test_scheduler_anneals_the_ternary_rate_too():
    model = mlp()
    opt = ScaledOptum.for_model(model, lr=0.01, threshold=2, ternary_lr=8.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    assert opt.ternary_group["lr"] == 0.0 and opt.param_groups[0]["lr"] == 0.0
    t0 = model[0].T.clone()
    for _ in range(3):
        train(model, opt, 1)
        sched.step()
    assert torch.equal(model[0].T, t0) and int(model[0].step) == 3  # corr still accumulates


def test_state_bytes_per_weight_at_most_two():
    model = nn.Sequential(IntTernaryLinear(64, 128), nn.ReLU(), IntTernaryLinear(128, 10))
    opt = ScaledOptum.for_model(model)
    # pressure 1 + corr_accum 8/32 + E 1/32 per weight, plus one int64 step per layer
    expected = 1 + 9 / 32 + 2 * 8 / (64 * 128 + 128 * 10)
    assert scaled_optum_state_bytes_per_weight(opt) == pytest.approx(expected)
    assert expected <= 2
    assert scaled_optum_state_bytes_per_weight(ScaledOptum([nn.Parameter(torch.ones(1))])) == 0


def test_learns_digits_with_int_ternary_hidden_layer():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16, dtype=torch.float32)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(IntTernaryLinear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = ScaledOptum.for_model(model, lr=0.01)
    for _ in range(8):
        for idx in train_idx[torch.randperm(1400)].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    assert accuracy >= 0.8  # chance is 0.1
    assert model[0].step.item() == 8 * 22 and model[0].pressure.abs().max() < 64


def test_memory_summary_counts_the_integer_state_of_the_trained_modules():
    from chimera.optim import optimizer_state_memory_summary

    model = torch.nn.Sequential(IntTernaryLinear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    opt = ScaledOptum.for_model(model, lr=0.01)
    summary = optimizer_state_memory_summary(opt)
    assert summary["other"] == model[0].state_bytes() == summary["total"]
    assert summary["total"] / model[0].T.numel() <= 2.0


def test_momentum_decay_gives_lions_update():
    """sign(b1 m + (1 - b1) g), m <- b2 m + (1 - b2) g; g2 = -0.5 is where it leaves Signum."""
    grads = [[1.0, -1.0], [-0.5, 0.25], [-0.5, 0.25], [2.0, -3.0]]
    lion = nn.Parameter(torch.zeros(2))
    signum = nn.Parameter(torch.zeros(2))
    opt = ScaledOptum([lion], lr=0.5, momentum=0.9, momentum_decay=0.99)
    heavy_ball = ScaledOptum([signum], lr=0.5, momentum=0.9)
    m, expected = torch.zeros(2), torch.zeros(2)
    for g in map(torch.tensor, grads):
        expected -= 0.5 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        lion.grad, signum.grad = g.clone(), g.clone()
        opt.step()
        heavy_ball.step()
        assert torch.equal(lion, expected)
    assert torch.allclose(opt.state[lion]["sign_momentum"], m / 0.01)  # buf = m / (1 - b2)
    assert lion.tolist() == [0.0, 0.0] and signum.tolist() == [-1.0, 2.0]


def test_momentum_decay_none_and_equal_to_momentum_are_heavy_ball_signum():
    grads = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    runs = []
    for decay in (None, 0.5):
        p = nn.Parameter(torch.zeros(5))
        opt = ScaledOptum([p], lr=0.125, momentum=0.5, momentum_decay=decay)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]["sign_momentum"]))
    buf = torch.zeros(5)
    for g in grads:
        buf = 0.5 * buf + g
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.allclose(runs[0][1], buf)


def test_a_state_saved_without_momentum_decay_loads_as_heavy_ball():
    model = mlp()
    opt = ScaledOptum.for_model(model, lr=0.01, momentum=0.9, momentum_decay=0.99)
    train(model, opt, 2)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["momentum_decay"]
    opt.load_state_dict(state)
    assert opt.param_groups[0]["momentum_decay"] is None
    train(model, opt, 1)
    assert int(model[0].step) == 3


def test_fused_step_with_momentum_decay_matches_eager_on_cpu():
    models = [mlp(), mlp()]
    opts = [ScaledOptum.for_model(m, lr=0.01, threshold=3, ternary_lr=2.0, momentum=0.9,
                                  momentum_decay=0.99, fused=fused)
            for m, fused in zip(models, (False, True), strict=True)]
    for model, opt in zip(models, opts, strict=True):
        train(model, opt, 4)
    state, state2 = full_state(models[0]), full_state(models[1])
    assert all(torch.equal(v, state2[k]) for k, v in state.items())
    p0, p1 = models[0][2].weight, models[1][2].weight
    assert torch.equal(opts[0].state[p0]["sign_momentum"], opts[1].state[p1]["sign_momentum"])


def mnist1d_recipe_cnn(seed: int) -> tuple[nn.Module, ScaledOptum]:
    """The bench's int_ternary CNN (first conv and head fp32) and its ScaledOptum recipe."""
    from chimera.bench.jobs.compare_quant import quant_recipes
    from chimera.run.build import build_optimizer, build_run_model

    spec = quant_recipes()["int_ternary"]
    assert spec.optimizer_hparams == {"lr": 1e-2, "momentum": 0.9, "momentum_decay": 0.99}
    torch.manual_seed(seed)
    model = build_run_model(spec, (40,), 10)
    return model, build_optimizer(spec.optimizer, model, **spec.optimizer_hparams)


def test_mnist1d_recipe_state_is_integer_within_budget_and_deterministic():
    runs = []
    for _ in range(2):
        model, opt = mnist1d_recipe_cnn(seed=0)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            x, y = torch.randn(16, 40, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append(full_state(model))
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    # fan-in 75 = 3 groups of 32: pressure 1 + (8 + 1) * 3 / 75, plus one int64 step per layer
    assert len(opt.ternary_modules) == 2
    expected = 1 + 27 / 75 + 2 * 8 / 3750
    assert scaled_optum_state_bytes_per_weight(opt) == pytest.approx(expected) and expected <= 1.5
    for module in opt.ternary_modules:
        assert {k: v.dtype for k, v in module.named_buffers()} == {
            "T": torch.int8, "E": torch.int8, "corr_accum": torch.int64, "step": torch.int64,
            "pressure": torch.int8}
        assert int(module.step) == 3 and module.weight not in opt.state  # no float state on W
    floats = [p for g in opt.param_groups if not g.get("ternary") for p in g["params"]]
    assert {id(p) for p in opt.state} == {id(p) for p in floats}
