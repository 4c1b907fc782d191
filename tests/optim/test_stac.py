"""STAC (docs/algorithms.md#stac): partition rule, trunk equations, AdamW cap, errors and state
dicts."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from chimera.optim.stac import STAC, normalize_names, partition_trainable_layers


class Net(nn.Module):
    """A root parameter then three layers: '<root>', 'a', 'b', 'head'."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)


def make_net(seed: int = 0, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def set_grads(params, seed: int, skip: tuple[int, ...] = ()) -> None:
    """Give each parameter a random gradient (``None`` for the indices in ``skip``)."""
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=gen, dtype=p.dtype)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: copy.deepcopy(opt.state.get(p, {})) for i, p in enumerate(model.parameters())}
    return params, state


def assert_state_equal(s1: dict, s2: dict) -> None:
    assert s1.keys() == s2.keys()
    for key in s1:
        assert torch.equal(torch.as_tensor(s1[key]), torch.as_tensor(s2[key])), key


def assert_same(model1, opt1, model2, opt2) -> None:
    for p1, p2 in zip(model1.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)
        assert_state_equal(opt1.state.get(p1, {}), opt2.state.get(p2, {}))


def one_param_model(values, dtype=torch.float64) -> nn.Module:
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor(values, dtype=dtype))
    return model


# ----------------------------------------------------------------------------- partition


def test_partition_follows_registration_order_with_root_params():
    model = make_net()
    part = partition_trainable_layers(model)
    assert part.trunk_layer_names == ("<root>", "a", "b")
    assert part.cap_layer_names == ("head",)
    assert part.trunk_layers[0].parameter_names == ("scale",)
    assert part.trunk_layers[1].parameter_names == ("a.weight", "a.bias")
    assert part.trunk_parameters == (
        model.scale,
        model.a.weight,
        model.a.bias,
        *model.b.parameters(),
    )
    assert part.cap_parameters == (model.head.weight, model.head.bias)


def test_containers_without_own_params_are_not_layers():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1))
    part = partition_trainable_layers(model, last_n_layers=1)
    assert part.trunk_layer_names == ("0.0",)
    assert part.cap_layer_names == ("1",)
    assert part.trunk_layers[0].parameter_names == ("0.0.weight", "0.0.bias")


def test_frozen_parameters_and_layers_are_left_out():
    model = make_net()
    model.a.weight.requires_grad_(False)
    model.b.requires_grad_(False)
    part = partition_trainable_layers(model, last_n_layers=2)
    assert part.trunk_layer_names == ("<root>",)
    assert part.cap_layer_names == ("a", "head")
    assert part.cap_layers[0].parameters == (model.a.bias,)


class Tied(nn.Module):
    """Embedding tied to the output projection, and one module registered twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mid = nn.Linear(3, 3)
        self.mid_again = self.mid
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def test_shared_parameters_belong_to_their_first_owner():
    model = Tied()
    part = partition_trainable_layers(model, last_n_layers=1)
    assert part.trunk_layer_names == ("emb",)  # 'out' owns only the tied weight: no layer
    assert part.cap_layer_names == ("mid",)  # the second registration of 'mid' is not a layer
    everything = part.trunk_parameters + part.cap_parameters
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))


@pytest.mark.parametrize(("n", "trunk", "cap"), [(0, 4, 0), (1, 3, 1), (4, 0, 4), (99, 0, 4)])
def test_last_n_layers_counts(n, trunk, cap):
    part = partition_trainable_layers(make_net(), last_n_layers=n)
    assert (len(part.trunk_layers), len(part.cap_layers)) == (trunk, cap)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_last_n_layers_is_rejected(bad):
    with pytest.raises(ValueError, match="last_n_layers"):
        partition_trainable_layers(make_net(), last_n_layers=bad)
    with pytest.raises(ValueError, match="last_n_layers"):
        STAC(make_net(), last_n_layers=bad)


@pytest.mark.parametrize("model", [nn.ReLU(), nn.Linear(2, 2).requires_grad_(False)])
def test_model_without_trainable_parameter_is_rejected(model):
    with pytest.raises(ValueError, match="at least one trainable parameter"):
        STAC(model)


# ----------------------------------------------------------------------------- construction


def test_default_learning_rates_and_group_layout():
    model = make_net()
    opt = STAC(model, lr=0.01, weight_decay=0.1)
    trunk, cap = opt.param_groups
    assert (trunk["stac_role"], cap["stac_role"]) == ("trunk", "cap")
    assert trunk["layer_names"] == ("<root>", "a", "b") and cap["layer_names"] == ("head",)
    assert trunk["params"] == list(opt.partition.trunk_parameters)
    assert cap["params"] == list(opt.partition.cap_parameters)
    assert trunk["lr"] == pytest.approx(0.0075) and cap["lr"] == 0.01
    assert trunk["weight_decay"] == cap["weight_decay"] == 0.1
    assert trunk["trunk_momentum"] == 0.9 and cap["betas"] == (0.9, 0.999)
    assert opt.partition.cap_layer_names == ("head",)


def test_explicit_learning_rates_and_weight_decays_win():
    opt = STAC(
        make_net(),
        lr=0.01,
        trunk_lr=0.3,
        cap_lr=0.2,
        weight_decay=0.1,
        trunk_weight_decay=0.0,
        cap_weight_decay=0.5,
    )
    trunk, cap = opt.param_groups
    assert (trunk["lr"], cap["lr"]) == (0.3, 0.2)
    assert (trunk["weight_decay"], cap["weight_decay"]) == (0.0, 0.5)


@pytest.mark.parametrize(("n", "role"), [(0, "trunk"), (4, "cap"), (50, "cap")])
def test_a_single_role_gets_the_plain_lr_and_one_group(n, role):
    opt = STAC(make_net(), lr=0.01, last_n_layers=n)
    assert [g["stac_role"] for g in opt.param_groups] == [role]
    assert opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize(
    ("bad", "name"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"trunk_lr": -0.1}, "trunk_lr"),
        ({"cap_lr": -0.1}, "cap_lr"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"trunk_weight_decay": -1.0}, "trunk_weight_decay"),
        ({"cap_weight_decay": -1.0}, "cap_weight_decay"),
        ({"trunk_momentum": 1.0}, "trunk_momentum"),
        ({"trunk_momentum": -0.1}, "trunk_momentum"),
        ({"foreach": "yes"}, "foreach"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        STAC(make_net(), **bad)


def test_parameters_instead_of_a_model_are_rejected():
    with pytest.raises(ValueError, match=r"or unnamed parameters with named_by=model"):
        STAC(make_net().parameters())
    with pytest.raises(ValueError, match="nn.Module"):
        STAC(torch.zeros(3))


def names(opt: STAC) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return opt.partition.trunk_layer_names, opt.partition.cap_layer_names


def test_param_groups_are_named_by_the_model():
    """Factories call ``cls(param_groups, **kwargs)``: without ``named_by`` the error says how
    to name them; with it STAC partitions the model's layers those groups hold."""
    model = make_net()
    groups = [{"params": list(model.parameters())[:3], "weight_decay": 0.01},
              {"params": list(model.parameters())[3:], "weight_decay": 0.0}]
    with pytest.raises(ValueError, match=r"param groups with named_by=model"):
        STAC(groups, lr=0.01)
    whole = names(STAC(model, lr=0.01))
    assert names(STAC(groups, named_by=model, lr=0.01)) == whole
    assert names(STAC(list(model.parameters()), named_by=model)) == whole
    head_only = STAC([model.head.weight, model.head.bias], named_by=model, last_n_layers=0)
    assert names(head_only) == (("head",), ())
    with pytest.raises(ValueError, match="a parameter that the named_by model does not own"):
        STAC([nn.Parameter(torch.zeros(2))], named_by=model)
    with pytest.raises(ValueError, match="with named_by, STAC takes parameters or param groups"):
        STAC(model, named_by=model)
    kwargs = {"model": model, "lr": 0.01}  # Hugging Face's Trainer passes kwargs' model first
    assert names(STAC(kwargs.pop("model"), **kwargs)) == whole


def test_named_parameters_give_the_model_partition_and_trajectory():
    model, model2 = make_net(), make_net()
    model.a.bias.requires_grad_(False)  # frozen: left out of the partition
    opt = STAC(model, lr=0.01, last_n_layers=2)
    named = [(n, p) for n, p in model2.named_parameters() if n != "a.bias"]
    opt2 = STAC(iter(named), lr=0.01, last_n_layers=2)
    assert opt2.last_n_layers == opt.last_n_layers == 2
    assert opt2.partition.trunk_layer_names == opt.partition.trunk_layer_names == ("<root>", "a")
    assert [g["layer_names"] for g in opt2.param_groups] == [
        g["layer_names"] for g in opt.param_groups]
    assert opt2.partition.trunk_layers[1].parameter_names == ("a.weight",)
    train(model, opt, 3)
    train(model2, opt2, 3)
    assert_same(model, opt, model2, opt2)
    assert copy.deepcopy(opt2).last_n_layers == 2


@pytest.mark.parametrize(("names", "normal"), [
    (["module._orig_mod.fc.weight", "module.w"], ["fc.weight", "w"]),
    (["_orig_mod.module.fc.weight"], ["fc.weight"]),
    (["block._orig_mod.0.bias"], ["block.0.bias"]),
    (["module.module.w"], ["w"]),
    (["module"], ["module"]),
    (["encoder.module.w"], ["encoder.module.w"]),
    (["scale", "module.weight", "head.weight"], ["scale", "module.weight", "head.weight"]),
])
def test_normalize_names_drops_wrapper_prefixes(names, normal):
    assert normalize_names(names) == normal


def test_layer_names_of_a_wrapped_root_become_the_root():
    assert normalize_names(["module", "module.fc"], root="<root>") == ["<root>", "fc"]
    assert normalize_names(["_orig_mod", "_orig_mod.fc"], root="<root>") == ["<root>", "fc"]


def test_a_child_called_module_is_a_layer_of_a_plain_model():
    """Only a prefix every name shares is a wrapper's: a plain model's child ``module`` stays."""
    model = nn.Module()
    model.scale = nn.Parameter(torch.ones(2))
    model.module, model.head = nn.Linear(2, 2), nn.Linear(2, 1)
    opt = STAC(model, last_n_layers=1)
    assert opt.partition.trunk_layer_names == ("<root>", "module")
    wrapped = STAC(nn.DataParallel(model), last_n_layers=1)
    assert wrapped.partition.trunk_layer_names == ("<root>", "module")
    wrapped.load_state_dict(opt.state_dict())


WRAPPERS = {
    "plain": lambda m: m,
    "compiled": torch.compile,
    "data_parallel": nn.DataParallel,
    "compiled_data_parallel": lambda m: torch.compile(nn.DataParallel(m)),
}


@pytest.mark.parametrize(("save", "load"), [
    ("compiled", "plain"), ("plain", "compiled"), ("data_parallel", "plain"),
    ("plain", "data_parallel"), ("compiled_data_parallel", "plain"),
])
def test_state_saved_on_a_wrapped_model_loads_on_the_plain_one_and_back(save, load):
    model, model2 = make_net(), make_net()
    opt = STAC(WRAPPERS[save](model), lr=0.01)
    assert opt.partition.trunk_layer_names == ("<root>", "a", "b")
    assert opt.partition.cap_layers[0].parameter_names == ("head.weight", "head.bias")
    train(model, opt, 2)
    model2.load_state_dict(model.state_dict())
    opt2 = STAC(WRAPPERS[load](model2), lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 2, first_seed=7)
    train(model2, opt2, 2, first_seed=7)
    assert_same(model, opt, model2, opt2)


def test_saved_layer_names_with_wrapper_prefixes_are_normalised_on_load():
    model = make_net()
    state = saved_state(model)
    for group in state["param_groups"]:
        group["layer_names"] = tuple(f"module._orig_mod.{n}" for n in group["layer_names"])
    opt = STAC(make_net())
    opt.load_state_dict(state)
    assert opt.param_groups[1]["layer_names"] == ("head",)


def test_add_param_group_is_refused_even_after_deepcopy():
    model = make_net()
    opt = STAC(model)
    extra = {"params": [nn.Parameter(torch.zeros(2))]}
    with pytest.raises(RuntimeError, match="does not support add_param_group"):
        opt.add_param_group(extra)
    with pytest.raises(RuntimeError, match="does not support add_param_group"):
        copy.deepcopy(opt).add_param_group(extra)


# ----------------------------------------------------------------------------- trunk math


def test_trunk_pinned_values():
    """lr 0.1: sign momentum keeps the last coordinate moving down; plain sign flips it."""
    grads = [[0.5, -1.0, 0.0, 2.0], [-1.0, -1.0, 0.3, -0.1]]
    expected = {0.9: [1.0, -1.8, 0.4, -0.2], 0.0: [1.0, -1.8, 0.4, 0.0]}
    for momentum, final in expected.items():
        model = one_param_model([1.0, -2.0, 0.5, 0.0])
        opt = STAC(model, lr=0.1, last_n_layers=0, trunk_momentum=momentum)
        for g in grads:
            model.w.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
        torch.testing.assert_close(model.w.detach(), torch.tensor(final, dtype=torch.float64))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
def test_trunk_matches_hand_computation(momentum, maximize, weight_decay):
    lr = 0.05
    model = one_param_model([0.3, -1.2, 2.0, 0.0, -0.7])
    opt = STAC(
        model,
        lr=lr,
        last_n_layers=0,
        trunk_momentum=momentum,
        weight_decay=weight_decay,
        maximize=maximize,
    )
    p = model.w.detach().clone()
    b = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        model.w.grad = g.clone()
        opt.step()
        u = -g if maximize else g
        p = p * (1 - lr * weight_decay)
        b = momentum * b + (1 - momentum) * u
        p = p - lr * torch.sign(b if momentum else u)
        torch.testing.assert_close(model.w.detach(), p)
    if momentum:
        torch.testing.assert_close(opt.state[model.w]["trunk_momentum_buffer"], b)
    else:
        assert not opt.state.get(model.w)  # plain sign descent keeps no state


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("maximize", [False, True])
def test_foreach_trunk_and_cap_match_the_for_loop(momentum, maximize):
    runs = []
    for foreach in (False, True):
        model = make_net()
        opt = STAC(
            model,
            lr=0.01,
            last_n_layers=1,
            trunk_momentum=momentum,
            weight_decay=0.1,
            maximize=maximize,
            amsgrad=True,
            foreach=foreach,
        )
        for step in range(5):
            # parameter 2 (a.bias) never has a gradient; parameter 1 misses it at step 2
            set_grads(model.parameters(), seed=step, skip=(2, 1) if step == 2 else (2,))
            opt.step()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert_same(m1, o1, m2, o2)
    assert not o1.state.get(m1.a.bias)
    assert momentum == 0 or "trunk_momentum_buffer" in o1.state[m1.a.weight]


# ----------------------------------------------------------------------------- AdamW cap

ADAMW_CONFIGS = [
    {},
    {"amsgrad": True},
    {"maximize": True},
    {"weight_decay": 0.1},
    {"amsgrad": True, "maximize": True, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
]


def run_both(stac_model, opt, torch_params, torch_opt, steps=6) -> None:
    for step in range(steps):
        set_grads(stac_model.parameters(), seed=step)
        for p, q in zip(opt.partition.cap_parameters, torch_params, strict=True):
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()


@pytest.mark.parametrize("config", ADAMW_CONFIGS)
def test_all_cap_equals_torch_adamw(config):
    model = make_net()
    reference = copy.deepcopy(model)
    opt = STAC(model, lr=0.02, last_n_layers=99, **config)
    torch_opt = torch.optim.AdamW(
        reference.parameters(), lr=0.02, **{"weight_decay": 0.0, **config}
    )
    run_both(model, opt, list(reference.parameters()), torch_opt)
    assert_same(model, opt, reference, torch_opt)
    assert set(opt.state[model.head.weight]) >= {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("config", ADAMW_CONFIGS)
def test_cap_of_a_mixed_model_equals_torch_adamw(config):
    model = make_net()
    opt = STAC(model, lr=0.02, last_n_layers=2, **config)
    cap = [copy.deepcopy(p) for p in opt.partition.cap_parameters]
    torch_opt = torch.optim.AdamW(cap, lr=0.02, **{"weight_decay": 0.0, **config})
    run_both(model, opt, cap, torch_opt)
    for p, q in zip(opt.partition.cap_parameters, cap, strict=True):
        assert torch.equal(p, q)
        assert_state_equal(opt.state[p], torch_opt.state[q])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("sparse_layer", [0, 1])  # 0 is the trunk, 1 the cap
def test_sparse_gradients_are_rejected_in_either_role(sparse_layer):
    model = nn.Sequential(*(nn.Embedding(6, 2, sparse=i == sparse_layer) for i in range(2)))
    opt = STAC(model, last_n_layers=1)
    before = [p.detach().clone() for p in model.parameters()]
    idx = torch.tensor([1, 3])
    (model[0](idx).sum() + model[1](idx).sum()).backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def nan_in_cap(model: Net, value: float = float("nan")) -> None:
    model.head.bias.grad[0] = value  # the cap is updated last: nothing may move before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_error_if_nonfinite_raises_before_any_parameter_moves(value):
    model = make_net()
    opt = STAC(model, error_if_nonfinite=True)
    set_grads(model.parameters(), seed=0)
    opt.step()
    params, state = snapshot(model, opt)
    set_grads(model.parameters(), seed=1)
    nan_in_cap(model, value)
    with pytest.raises(RuntimeError, match="non-finite gradients"):
        opt.step()
    after_params, after_state = snapshot(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(params, after_params, strict=True))
    for i in state:
        assert_state_equal(state[i], after_state[i])


def test_nonfinite_gradient_skips_the_whole_step_and_is_counted():
    model = make_net()
    opt = STAC(model, amsgrad=True)
    for step in range(2):
        set_grads(model.parameters(), seed=step)
        opt.step()
    params, state = snapshot(model, opt)
    set_grads(model.parameters(), seed=2)
    nan_in_cap(model)
    opt.step()
    assert opt.nonfinite_skipped_steps == 1
    after_params, after_state = snapshot(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(params, after_params, strict=True))
    for i in state:  # momentum buffers, Adam moments and step counters untouched
        assert_state_equal(state[i], after_state[i])
    set_grads(model.parameters(), seed=3)
    opt.step()  # the next finite step proceeds, with a finite momentum
    assert opt.nonfinite_skipped_steps == 1
    assert not torch.equal(model.a.weight, params[1])
    assert torch.isfinite(opt.state[model.a.weight]["trunk_momentum_buffer"]).all()
    assert opt.state[model.head.weight]["step"].item() == 3


# ----------------------------------------------------------------------------- state dicts


def train(model, opt, steps, first_seed=0) -> None:
    for step in range(first_seed, first_seed + steps):
        set_grads(model.parameters(), seed=step)
        opt.step()


def test_state_dict_round_trip_then_identical_continuation():
    model = make_net()
    opt = STAC(model, lr=0.01, amsgrad=True, weight_decay=0.01)
    train(model, opt, 3)
    set_grads(model.parameters(), seed=99)
    nan_in_cap(model)
    opt.step()  # one skipped step, to be saved
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    model2 = copy.deepcopy(model)
    opt2 = STAC(model2, lr=0.01, amsgrad=True, weight_decay=0.01)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.nonfinite_skipped_steps == 1
    assert opt2.param_groups[0]["layer_names"] == ("<root>", "a", "b")
    assert_same(model, opt, model2, opt2)
    train(model, opt, 3, first_seed=10)
    train(model2, opt2, 3, first_seed=10)
    assert_same(model, opt, model2, opt2)


def test_deepcopy_keeps_partition_and_counter():
    model = make_net()
    opt = STAC(model)
    opt.nonfinite_skipped_steps = 4
    train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.nonfinite_skipped_steps == 4
    assert opt2.partition.cap_parameters == (model2.head.weight, model2.head.bias)
    train(model, opt, 2, first_seed=5)
    train(model2, opt2, 2, first_seed=5)
    assert_same(model, opt, model2, opt2)


class Renamed(nn.Module):
    """Same shapes and counts as ``Net`` but other layer names."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.first = nn.Linear(4, 3)
        self.second = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)


def saved_state(model: nn.Module, **kwargs) -> dict:
    opt = STAC(model, **kwargs)
    train(model, opt, 1)
    return opt.state_dict()


def frozen_head_bias() -> Net:
    model = make_net()
    model.head.bias.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    ("source", "target", "match"),
    [
        ((make_net, {"last_n_layers": 1}), (make_net, {"last_n_layers": 0}), "parameter groups"),
        ((make_net, {"last_n_layers": 0}), (make_net, {"last_n_layers": 9}), "stac_role"),
        ((make_net, {}), (frozen_head_bias, {}), "parameters"),
        ((make_net, {}), (Renamed, {}), "layer names"),
        ((make_net, {}), (lambda: make_net(width=5), {}), "shape"),
    ],
)
def test_state_of_another_partition_is_rejected(source, target, match):
    state = saved_state(source[0](), **source[1])
    opt = STAC(target[0](), **target[1])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)


def test_saved_state_without_roles_is_rejected():
    model = make_net()
    state = saved_state(model)
    for group in state["param_groups"]:
        del group["stac_role"]
    with pytest.raises(ValueError, match="stac_role"):
        STAC(make_net()).load_state_dict(state)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="stac_role"):
        STAC(make_net(), last_n_layers=9).load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("bad", [None, [], {}, {"state": {}}, {"state": {}, "param_groups": [1]}])
def test_a_state_that_is_no_state_dict_is_a_value_error(bad):
    with pytest.raises(ValueError, match="must be an optimizer state dict"):
        STAC(make_net()).load_state_dict(bad)


@pytest.mark.parametrize(("key", "value"), [
    ("maximize", "yes"), ("amsgrad", 1), ("error_if_nonfinite", None), ("foreach", "no"),
    ("fused", 2),
])
def test_saved_switches_are_validated_before_loading(key, value):
    state = saved_state(make_net())
    state["param_groups"][1][key] = value
    opt = STAC(make_net())
    with pytest.raises(ValueError, match=f"loaded cap group: {key} must be"):
        opt.load_state_dict(state)
    assert opt.param_groups[1][key] in (False, None)  # nothing was loaded


def test_closure_runs_with_grad_and_its_value_is_returned():
    model = make_net()
    opt = STAC(model)
    x = torch.randn(5, 4)

    def closure():
        opt.zero_grad()
        loss = model.head(model.b(model.a(x) * model.scale)).pow(2).mean()
        loss.backward()
        return loss

    before = model.a.weight.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
    assert not torch.equal(model.a.weight, before)
