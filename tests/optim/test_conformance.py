"""Conformance suite (docs/algorithms.md#conformance): every optimizer of the registry, in the
style of torch's
OptimizerInfo. Adding an optimizer to the registry without an entry here fails the suite."""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from chimera.optim import OPTIMIZERS, build_optimizer
from chimera.optim.factory import optimizer_hparam_names


@dataclass
class OptInfo:
    name: str
    hparams: dict[str, Any]  # converges on the small problem within STEPS steps
    invalid: list[dict[str, Any]]  # each raises ValueError
    maximize: bool = True  # supports maximize=True
    sparse_ok: bool = False  # accepts sparse gradients (else RuntimeError "sparse")
    nonfinite: str = "propagate"  # "propagate": NaN reaches the params; "skip": step skipped
    fast_paths: list[dict[str, Any]] = field(default_factory=list)  # vs {"foreach": False}
    # numeric hyper-parameters whose default is None (the others are found from the signature)
    optional_numbers: list[str] = field(default_factory=list)
    checks_loaded_state: bool = True  # load_state_dict rejects other optimizers' states
    param_state: bool = True  # keeps per-parameter state (tensors shaped like the parameter)


INFOS = {
    i.name: i
    for i in [
        OptInfo("sgd", {"lr": 0.05, "momentum": 0.9},
                [{"lr": -1.0}, {"momentum": -0.1}, {"weight_decay": -1.0},
                 {"nesterov": True, "momentum": 0.0}],
                sparse_ok=True, fast_paths=[{"foreach": True}], checks_loaded_state=False),
        OptInfo("adam", {"lr": 0.02},
                [{"lr": -1.0}, {"betas": (1.0, 0.9)}, {"eps": -1.0}, {"weight_decay": -1.0}],
                fast_paths=[{"foreach": True}], checks_loaded_state=False),
        OptInfo("adamw", {"lr": 0.02, "weight_decay": 0.01},
                [{"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": -1.0}, {"weight_decay": -1.0}],
                fast_paths=[{"foreach": True}], checks_loaded_state=False),
        OptInfo("lion", {"lr": 0.005, "weight_decay": 0.01},
                [{"lr": -1.0}, {"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)},
                 {"weight_decay": -1.0}, {"maximize": 1}, {"foreach": "yes"}],
                fast_paths=[{"foreach": True}, {"foreach": True, "maximize": True}]),
        OptInfo("chimera21", {"lr": 0.02, "weight_decay": 0.01},
                [{"lr": -1.0}, {"beta1": 1.0}, {"beta2": -0.1}, {"eps_opt": 0.0},
                 {"weight_decay": -1.0}, {"rho_psi": 1.5}, {"kappa_min": 0.0},
                 {"kappa_min": 1.0, "kappa_max": 0.5}, {"zero_grad_policy": "bogus"},
                 {"idle_decay": 1.5}, {"kappa_gate_mode": "bogus"}, {"gate_sharpness": -1.0},
                 {"psi_storage": "fp16"}, {"maximize": 1}],
                fast_paths=[{"foreach": True}, {"foreach": True, "maximize": True},
                            {"foreach": True, "psi_storage": "int8",
                             "kappa_gate_mode": "noise_ratio"}],
                optional_numbers=["eps"]),
        OptInfo("stac", {"lr": 0.01, "weight_decay": 0.01},
                [{"lr": -1.0}, {"last_n_layers": -1}, {"betas": (1.0, 0.9)}, {"eps": 0.0},
                 {"weight_decay": -1.0}, {"trunk_momentum": 1.5}, {"amsgrad": 1}],
                nonfinite="skip", fast_paths=[{"foreach": True}],
                optional_numbers=["trunk_lr", "cap_lr", "trunk_weight_decay",
                                  "cap_weight_decay"]),
        # on a model without integer-ternary modules: sign-SGD of the float parameters
        OptInfo("scaled_optum", {"lr": 0.005},
                [{"lr": -1.0}, {"threshold": 0}, {"threshold": 128},
                 {"default_group_size": 0}, {"ternary_lr": -1.0}, {"e_policy": "bogus"},
                 {"maximize": 1}, {"weight_decay": -1.0}],
                param_state=False),
    ]
}
NAMES = OPTIMIZERS.names()
STEPS = 40


def test_every_registered_optimizer_has_a_conformance_entry():
    assert set(NAMES) == set(INFOS)


class Tiny(nn.Module):
    """Two layers plus a zero-size root parameter (exercises '<root>' and empty tensors)."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.empty = nn.Parameter(torch.zeros(0, 3))
        self.lin1 = nn.Linear(4, hidden)
        self.lin2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(x))) + self.empty.sum()


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(seed)
    return Tiny(), x, y


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def run(opt, model, x, y, steps, sign=1.0):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        (sign * loss).backward() if sign != 1.0 else loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def build(name, model, **extra):
    return build_optimizer(name, model, **{**INFOS[name].hparams, **extra})


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", NAMES)
def test_loss_goes_down(name):
    model, x, y = make_problem()
    losses = run(build(name, model), model, x, y, STEPS)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", [n for n in NAMES if INFOS[n].maximize])
def test_maximize_makes_loss_go_up(name):
    model, x, y = make_problem()
    opt = build(name, model, maximize=True)
    losses = run(opt, model, x, y, 10)
    assert losses[-1] > losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_then_identical_continuation(name):
    model, x, y = make_problem()
    opt = build(name, model)
    run(opt, model, x, y, 3)
    model2 = copy.deepcopy(model)
    opt2 = build(name, model2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt, model, x, y, 3)
    run(opt2, model2, x, y, 3)
    assert torch.equal(flat(model), flat(model2))
    for s1, s2 in zip(opt.state.values(), opt2.state.values(), strict=True):
        for k, v in s1.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2[k])), k


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_continues_identically(name):
    model, x, y = make_problem()
    opt = build(name, model)
    run(opt, model, x, y, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    run(opt, model, x, y, 3)
    run(opt2, model2, x, y, 3)
    assert torch.equal(flat(model), flat(model2))


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_untouched_and_layer_frozen_mid_run(name):
    model, x, y = make_problem()
    opt = build(name, model)
    model.lin2.bias.requires_grad_(False)  # never receives a gradient
    bias0 = model.lin2.bias.detach().clone()
    run(opt, model, x, y, 3)
    assert torch.equal(model.lin2.bias, bias0)
    assert model.lin2.bias not in opt.state or not opt.state[model.lin2.bias]
    model.lin1.weight.requires_grad_(False)  # frozen mid-run
    model.lin1.weight.grad = None
    w0 = model.lin1.weight.detach().clone()
    other0 = model.lin1.bias.detach().clone()
    run(opt, model, x, y, 3)
    assert torch.equal(model.lin1.weight, w0)
    assert not torch.equal(model.lin1.bias, other0)


@pytest.mark.parametrize("name", NAMES)
def test_zero_size_parameter_is_fine(name):
    model, x, y = make_problem()
    opt = build(name, model)
    run(opt, model, x, y, 2)
    assert model.empty.shape == (0, 3)
    assert torch.isfinite(flat(model)).all()


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_have_their_own_lr(name):
    model, x, y = make_problem()
    if name == "stac":
        opt = build(name, model, trunk_lr=0.0, cap_lr=0.01)
        frozen, moving = model.lin1, model.lin2  # lin1 is trunk, lin2 the cap
    else:
        hp = INFOS[name].hparams
        groups = [
            {"params": [model.empty, *model.lin1.parameters()], "lr": 0.0},
            {"params": model.lin2.parameters(), "lr": hp["lr"], "weight_decay": 0.0},
        ]
        opt = build_optimizer(name, groups, **hp)
        frozen, moving = model.lin1, model.lin2
    f0 = [p.detach().clone() for p in frozen.parameters()]
    m0 = [p.detach().clone() for p in moving.parameters()]
    run(opt, model, x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(frozen.parameters(), f0, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(moving.parameters(), m0, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_evaluated_and_its_loss_returned(name):
    model, x, y = make_problem()
    opt = build(name, model)
    before = flat(model).clone()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert not torch.equal(flat(model), before)


@pytest.mark.parametrize(("name", "bad"), [(n, b) for n in NAMES for b in INFOS[n].invalid])
def test_invalid_hyperparameters_raise_value_error(name, bad):
    model, _, _ = make_problem()
    with pytest.raises(ValueError):
        build_optimizer(name, model, **{**INFOS[name].hparams, **bad})


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter_names_the_allowed_ones(name):
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match="no hyper-parameter 'bogus'.*allowed: .*lr"):
        build_optimizer(name, model, bogus=1)


def test_unknown_optimizer_lists_known_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'; known: .*chimera21"):
        build_optimizer("adamx", nn.Linear(2, 2))


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients(name):
    emb = nn.Embedding(10, 3, sparse=True)
    model = nn.Sequential(emb)
    opt = build(name, model)
    emb(torch.tensor([1, 2])).sum().backward()
    if INFOS[name].sparse_ok:
        opt.step()
    else:
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_behaviour(name):
    model, x, y = make_problem()
    opt = build(name, model)
    run(opt, model, x, y, 2)
    before = flat(model).clone()
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    model.lin1.weight.grad[0, 0] = float("nan")
    opt.step()
    if INFOS[name].nonfinite == "skip":
        assert torch.equal(flat(model), before)
        assert opt.nonfinite_skipped_steps == 1
    else:
        assert torch.isnan(model.lin1.weight[0, 0])


@pytest.mark.parametrize(("name", "fast"), [(n, f) for n in NAMES for f in INFOS[n].fast_paths])
def test_fast_path_matches_for_loop_path(name, fast):
    results = []
    for foreach in (False, True):
        model, x, y = make_problem()
        model.lin2.bias.requires_grad_(False)  # a parameter that never has a gradient
        opt = build(name, model, **{**fast, "foreach": foreach})
        run(opt, model, x, y, 3)
        model.lin1.bias.requires_grad_(False)  # frozen mid-run: its grad is None from here on
        model.lin1.bias.grad = None
        run(opt, model, x, y, 3)
        results.append((model, opt))
    (m1, o1), (m2, o2) = results
    torch.testing.assert_close(flat(m1), flat(m2), rtol=1e-6, atol=1e-7)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        s1, s2 = o1.state.get(p1, {}), o2.state.get(p2, {})
        assert s1.keys() == s2.keys()
        for k in s1:
            torch.testing.assert_close(torch.as_tensor(s1[k]), torch.as_tensor(s2[k]),
                                       rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize(("name", "multi_tensor"), [
    ("chimera21", "chimera.optim.chimera21._multi_tensor_chimera21"),
    ("lion", "chimera.optim.lion._multi_tensor_lion"),
    ("stac", "chimera.optim.stac._multi_tensor_stac_trunk"),
])
def test_foreach_none_follows_one_policy(name, multi_tensor, monkeypatch):
    """``foreach=None`` picks the foreach path where torch would: every tensor of the group on
    one device of a foreach-capable type, with one dtype (here CPU is declared capable)."""
    import chimera.optim._common as common

    calls = []
    module, fn = multi_tensor.rsplit(".", 1)
    real = getattr(__import__(module, fromlist=[fn]), fn)
    monkeypatch.setattr(f"{module}.{fn}", lambda *a, **k: (calls.append(1), real(*a, **k)))
    monkeypatch.setattr(common, "_get_foreach_kernels_supported_devices", lambda: ["cpu"])
    for mixed_dtypes, expected in ((False, 1), (True, 0)):
        calls.clear()
        model, _, _ = make_problem()
        if mixed_dtypes:
            model.lin1.double()
        opt = build(name, model, last_n_layers=0) if name == "stac" else build(name, model)
        opt.zero_grad()
        (model.lin1.weight.sum() + model.lin2.weight.sum()).backward()
        opt.step()
        assert len(calls) == expected, mixed_dtypes


# ---------------------------------------------------------------- non-finite hyper-parameters


def numeric_hparams(name: str) -> list[str]:
    """Every numeric hyper-parameter of ``name``: those with a number as default (from the
    signature) and the optional ones listed in its entry; ``betas`` pairs are tested apart."""
    cls = OPTIMIZERS.get(name).__wrapped__
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    found = [k for k in optimizer_hparam_names(name)
             if isinstance(defaults[k], int | float) and not isinstance(defaults[k], bool)]
    return found + INFOS[name].optional_numbers


NONFINITE = (math.nan, math.inf, -math.inf)


def assert_one_line_naming(err: pytest.ExceptionInfo, key: str) -> None:
    message = str(err.value)
    assert key in message and " must be " in message and "\n" not in message, message


@pytest.mark.parametrize(("name", "key", "value"),
                         [(n, k, v) for n in NAMES for k in numeric_hparams(n) for v in NONFINITE])
def test_nonfinite_hyperparameter_is_rejected_by_name(name, key, value):
    model, _, _ = make_problem()
    with pytest.raises(ValueError) as err:
        build(name, model, **{key: value})
    assert_one_line_naming(err, key)


def test_every_optimizer_has_numeric_hyperparameters_to_check():
    assert all("lr" in numeric_hparams(n) for n in NAMES)
    assert {"lambda_gate", "noise_threshold", "kappa_max"} <= set(numeric_hparams("chimera21"))


BETAS = [n for n in NAMES if "betas" in optimizer_hparam_names(n)]


@pytest.mark.parametrize(("name", "betas"), [
    (n, b) for n in BETAS
    for b in [(math.nan, 0.9), (0.9, math.inf), (0.9,), (0.9, 0.99, 0.5), 0.9, "ab"]
])
def test_betas_must_be_a_pair_of_finite_numbers(name, betas):
    model, _, _ = make_problem()
    with pytest.raises(ValueError) as err:
        build(name, model, betas=betas)
    assert_one_line_naming(err, "betas")


@pytest.mark.parametrize(("name", "value"),
                         [(n, v) for n in NAMES if n != "stac" for v in (math.inf, math.nan)])
def test_param_group_with_a_nonfinite_lr_is_rejected(name, value):
    model, _, _ = make_problem()
    groups = [{"params": list(model.lin1.parameters())},
              {"params": list(model.lin2.parameters()), "lr": value}]
    with pytest.raises(ValueError) as err:
        build_optimizer(name, groups, **INFOS[name].hparams)
    assert_one_line_naming(err, "lr")


# ---------------------------------------------------------------- loading foreign states

CHECKED = [n for n in NAMES if INFOS[n].checks_loaded_state]


def state_tensors(opt) -> list[torch.Tensor]:
    return [torch.as_tensor(v).clone() for s in opt.state.values() for v in s.values()]


def hyperparameters(opt) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.mark.parametrize(("name", "other"), [(n, o) for n in CHECKED for o in NAMES if o != n])
def test_loading_another_optimizers_state_is_rejected_and_changes_nothing(name, other):
    model, x, y = make_problem()
    source = build(other, model)
    run(source, model, x, y, 2)
    model2 = copy.deepcopy(model)
    opt = build(name, model2)
    run(opt, model2, x, y, 1)
    groups, tensors = copy.deepcopy(hyperparameters(opt)), state_tensors(opt)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(source.state_dict())
    assert "\n" not in str(err.value)
    assert hyperparameters(opt) == groups
    assert all(torch.equal(a, b) for a, b in zip(state_tensors(opt), tensors, strict=True))
    run(opt, model2, x, y, 1)  # still steps


@pytest.mark.parametrize("name", [n for n in CHECKED if INFOS[n].param_state])
def test_loading_a_state_of_other_shapes_is_rejected(name):
    model, x, y = make_problem()
    opt = build(name, model)
    run(opt, model, x, y, 2)
    with pytest.raises(ValueError, match=r"shape \(6, 4\).*\(8, 4\)|\(8, 4\).*\(6, 4\)"):
        build(name, Tiny(hidden=6)).load_state_dict(opt.state_dict())


@pytest.mark.parametrize(("name", "value"), [(n, v) for n in CHECKED for v in (math.inf, -1.0)])
def test_loading_an_own_state_with_a_bad_lr_is_rejected(name, value):
    model, x, y = make_problem()
    opt = build(name, model)
    run(opt, model, x, y, 1)
    state = opt.state_dict()
    state["param_groups"][-1]["lr"] = value
    with pytest.raises(ValueError, match=r"^loaded .*group.*: lr must be a (finite )?number >= 0"):
        build(name, copy.deepcopy(model)).load_state_dict(state)
