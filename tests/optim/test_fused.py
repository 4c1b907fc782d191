"""Compiled fast paths (``fused=True``) against the for-loop ground truth
(docs/algorithms.md#conformance).

Each parity test trains a tiny model twice, on the for-loop path and compiled, for several
steps with an lr that changes every step, a frozen parameter and a parameter (or module)
without gradient on some steps, then compares parameters, buffers and every optimizer state
tensor. Float state may differ by rounding (inductor does not use the FMA of some eager
kernels); integer state must match exactly. Each optimizer packs its options into one model
(several param groups), so the file compiles few graphs.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import chimera.optim._fused as fused_module
import chimera.optim.chimera21 as chimera21_module
import chimera.optim.stac as stac_module
from chimera.nn.int_ternary import IntTernaryLinear
from chimera.optim import STAC, Chimera21, ScaledOptum
from chimera.optim._fused import CPU_MIN_NUMEL, compile_usable, use_fused

STEPS = 6
NO_GRAD_STEPS = (2, 3)  # steps where a parameter (or module) gets no gradient
IN = 40
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs g++ on CPU"),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not compile_usable("cuda"), reason="needs CUDA with triton"),
    ),
]
LOOP = {"foreach": False, "fused": False}


class Net(nn.Module):
    """Three linear layers and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(IN, 8)
        self.lin2 = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin2(torch.tanh(self.lin1(x))))) * self.frozen[0]


def int_ternary_net() -> nn.Sequential:
    """Two integer-ternary layers (two corr groups per row in the first) and a float head whose
    bias is frozen."""
    net = nn.Sequential(
        IntTernaryLinear(IN, 16), nn.ReLU(), IntTernaryLinear(16, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    net[4].bias.requires_grad_(False)
    return net


def build_chimera21(model: Net, **kw) -> Chimera21:
    """Groups covering both psi storages, every zero-grad policy, the noise gate, weight decay,
    maximize and a group lr; the frozen parameter sits in the first group."""
    groups = [
        {"params": [model.lin1.weight, model.frozen], "weight_decay": 0.1},
        {
            "params": [model.lin1.bias],
            "psi_storage": "int8",
            "zero_grad_policy": "freeze",
            "kappa_gate_mode": "noise_ratio",
        },
        {
            "params": [*model.lin2.parameters()],
            "zero_grad_policy": "decay",
            "kappa_gate_mode": "noise_ratio",
            "weight_decay": 0.05,
            "maximize": True,
        },
        {
            "params": [*model.head.parameters()],
            "psi_storage": "int8",
            "zero_grad_policy": "inertia",
            "lr": 0.02,
        },
    ]
    return Chimera21(groups, lr=0.01, lambda_gate=2.0, **kw)


def build_stac(model: Net, **kw) -> STAC:
    return STAC(model, lr=0.01, weight_decay=0.01, amsgrad=True, **kw)


def build_scaled_optum(model: nn.Sequential, **kw) -> ScaledOptum:
    return ScaledOptum.for_model(
        model, lr=0.01, threshold=3, ternary_lr=2.0, e_policy="track", **kw
    )


def drop_head_bias(model: Net) -> None:
    model.head.bias.grad = None


def drop_lin2_bias(model: Net) -> None:
    model.lin2.bias.grad = None


def drop_head_weight_and_second_module(model: nn.Sequential) -> None:
    model[4].weight.grad = None
    model[2].weight.grad = None


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    drop: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
) -> None:
    """``steps`` steps on random data; every third gradient entry is exactly 0 (so the zero-grad
    policies act), ``drop`` removes gradients on ``NO_GRAD_STEPS``, every lr shrinks by 10%."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(16, IN, generator=gen).to(device)
        opt.zero_grad()
        model(x).square().mean().backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.view(-1)[::3] = 0
        if drop is not None and i in NO_GRAD_STEPS:
            drop(model)
        opt.step()
        for group in opt.param_groups:
            group["lr"] *= 0.9


def assert_same_state(opt_ref, opt, model_ref, model, *, exact: bool = False) -> None:
    """Parameters, buffers and every optimizer state tensor agree (integers exactly)."""
    pairs = list(zip(model_ref.state_dict().items(), model.state_dict().items(), strict=True))
    for p_ref, p in zip(model_ref.parameters(), model.parameters(), strict=True):
        s_ref, s = opt_ref.state.get(p_ref, {}), opt.state.get(p, {})
        assert s_ref.keys() == s.keys()
        pairs += [((key, value), (key, s[key])) for key, value in s_ref.items()]
    for (name, ref), (_, got) in pairs:
        ref, got = ref.cpu(), got.cpu()
        if exact or not ref.is_floating_point():
            assert torch.equal(got, ref), name
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7, msg=name)


def tensors_of(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of the parameters and of every optimizer state tensor."""
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in (*model.parameters(), *state)]


def twin_runs(make, build, device, drop, reference=LOOP):
    """Model and optimizer trained by the ``reference`` path and by ``fused=True``, and the
    number of graphs dynamo compiled for the latter."""
    runs = []
    for kw in (reference, {"fused": True}):
        torch.manual_seed(0)
        model = make().to(device)
        opt = build(model, **kw)
        graphs = counters["stats"]["unique_graphs"]
        train(model, opt, STEPS, drop)
        runs.append((model, opt, counters["stats"]["unique_graphs"] - graphs))
    (model_ref, opt_ref, _), (model, opt, graphs) = runs
    return model_ref, opt_ref, model, opt, graphs


@pytest.mark.parametrize("device", DEVICES)
def test_chimera21_fused_matches_for_loop(device):
    m0, o0, m1, o1, graphs = twin_runs(Net, build_chimera21, device, drop_head_bias)
    assert_same_state(o0, o1, m0, m1)
    assert o1.state[m1.head.bias]["step"].item() == STEPS - len(NO_GRAD_STEPS)
    assert o1.state[m1.head.bias]["psi"].dtype == torch.int8
    assert m1.frozen not in o1.state and torch.equal(m1.frozen.cpu(), torch.ones(3))
    # one graph per gradient structure: lr changes and step increments never recompile
    assert graphs == 2


@pytest.mark.parametrize("device", DEVICES)
def test_stac_fused_matches_for_loop(device):
    graphs_before = counters["stats"]["unique_graphs"]
    m0, o0, m1, o1, graphs = twin_runs(Net, build_stac, device, drop_lin2_bias)
    assert o1.partition.cap_layer_names == ("head",)
    assert_same_state(o0, o1, m0, m1)
    assert {"trunk_momentum_buffer"} == o1.state[m1.lin1.weight].keys()
    assert "max_exp_avg_sq" in o1.state[m1.head.weight]
    assert graphs == 2  # the trunk with and without lin2.bias; the cap is torch's fused AdamW
    # the compiled step checks the gradients itself: a non-finite one, in the trunk or in the
    # cap, moves nothing (same graph: no recompile)
    before = tensors_of(m1, o1)
    for param, value in ((m1.lin1.weight, float("nan")), (m1.head.bias, float("-inf"))):
        for p in m1.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        param.grad.view(-1)[1] = value
        o1.step()
        assert all(map(torch.equal, tensors_of(m1, o1), before))
    assert o1.nonfinite_skipped_steps == 2
    o1.param_groups[0]["error_if_nonfinite"] = True
    with pytest.raises(RuntimeError, match="non-finite"):
        o1.step()
    assert all(map(torch.equal, tensors_of(m1, o1), before))
    assert counters["stats"]["unique_graphs"] == graphs_before + graphs


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_optum_fused_matches_eager_exactly(device):
    m0, o0, m1, o1, graphs = twin_runs(
        int_ternary_net,
        build_scaled_optum,
        device,
        drop_head_weight_and_second_module,
        reference={"fused": False},
    )
    assert_same_state(o0, o1, m0, m1, exact=True)
    assert int(m1[0].step) == STEPS and int(m1[2].step) == STEPS - len(NO_GRAD_STEPS)
    assert m1[0].corr_accum.abs().sum() > 0 and m1[0].pressure.abs().sum() > 0
    assert graphs == 2


@pytest.mark.parametrize("device", DEVICES)
def test_state_saved_without_fused_continues_on_the_compiled_path(device):
    torch.manual_seed(0)
    model = Net().to(device)
    opt = build_chimera21(model, **LOOP)
    train(model, opt, 3)
    model2 = copy.deepcopy(model)
    opt2 = build_chimera21(model2, fused=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(g["fused"] is False for g in opt2.param_groups)  # saved groups win, as in torch
    for group in opt2.param_groups:
        group["fused"] = True
    train(model, opt, 3, seed=1)
    train(model2, opt2, 3, seed=1)
    assert_same_state(opt, opt2, model, model2)


def test_fused_none_keeps_the_eager_path_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("compiled on CPU with fused=None")

    monkeypatch.setattr(chimera21_module, "run_compiled", fail)
    model = Net()
    opt = build_chimera21(model)
    assert all(g["fused"] is None for g in opt.param_groups)
    train(model, opt, 2)
    params = list(model.parameters())
    assert not use_fused(None, params) and not use_fused(False, params)
    assert use_fused(True, params)


def test_stac_fused_cap_takes_gradients_of_other_strides():
    """torch's fused AdamW kernel needs the gradient in the parameter's layout; the cap
    gets a copy when the strides differ (all-cap STAC: nothing compiles)."""
    runs = []
    for kw in (LOOP, {"fused": True}):
        torch.manual_seed(0)
        model = Net()
        opt = STAC(model, lr=0.01, last_n_layers=10, **kw)
        for _ in range(3):
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape[::-1]).t() if p.dim() == 2 else torch.randn_like(p)
            opt.step()
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    assert not o1.partition.trunk_layers
    assert_same_state(o0, o1, m0, m1)


def test_fused_none_compiles_from_cpu_min_numel_parameters_on_cpu(monkeypatch):
    calls = []

    def record(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return torch.tensor(True)

    monkeypatch.setattr(chimera21_module, "run_compiled", record)
    monkeypatch.setattr(stac_module, "run_compiled", record)
    monkeypatch.setattr(fused_module, "cpu_compile_usable", lambda: True)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(2, 2))
    assert sum(p.numel() for p in model.parameters()) >= CPU_MIN_NUMEL
    for opt in (Chimera21(model.parameters()), STAC(model)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert calls == ["_compiled_chimera21", "_compiled_stac_trunk"]
    model[0].weight.grad = None  # below the threshold now: eager
    Chimera21(model.parameters()).step()
    assert len(calls) == 2
    model[0].weight.grad = torch.ones_like(model[0].weight)
    monkeypatch.setattr(fused_module, "cpu_compile_usable", lambda: False)  # no C++ compiler
    Chimera21(model.parameters()).step()
    assert len(calls) == 2


def test_state_dict_without_fused_key_loads():
    model = Net()
    opt = build_chimera21(model)
    train(model, opt, 1)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["fused"]
    opt2 = build_chimera21(copy.deepcopy(model))
    opt2.load_state_dict(state)
    assert all(g["fused"] is None for g in opt2.param_groups)


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_bad_fused_values_raise(bad):
    model = Net()
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        Chimera21(model.parameters(), fused=bad)
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        STAC(model, fused=bad)
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        ScaledOptum(model.parameters(), fused=bad)
    opt = Chimera21(model.lin1.parameters())
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        opt.add_param_group({"params": model.lin2.parameters(), "fused": bad})


def test_fused_true_with_foreach_true_raises():
    model = Net()
    with pytest.raises(ValueError, match="fused.*foreach=True"):
        Chimera21(model.parameters(), fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused.*foreach=True"):
        STAC(model, fused=True, foreach=True)
    Chimera21(model.parameters(), fused=True, foreach=False)  # fused wins, as in torch's Adam
