"""ScaledOptum's three step paths against each other, bit for bit: the for-loop ground truth
(``foreach=False``: the modules' own ``update_corr`` / ``update_ternary`` /
``rebalance_exponent``), the default eager step (``ternary_step_`` per module) and the compiled
step (``fused=True``), on every integer buffer, the ``weight`` caches, the float parameters and
the momentum state, over several steps with partial groups, a frozen ternary module, modules
without gradient on some steps, non-finite gradients, maximize and a changing lr."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

import chimera.optim._fused as fused_module
import chimera.optim.scaled_optum as so
from chimera.nn.int_ternary import IntTernaryConv2d, IntTernaryLinear
from chimera.optim.scaled_optum import (
    ScaledOptum,
    abs_sums,
    gradient_scales,
    pressure_increment,
)

STEPS = 5
NO_GRAD_STEPS = (1, 2)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """A conv (fan-in 27: one partial group), linears with fan-in 40 (a full and a partial
    group) and 64 (two full groups), a frozen ternary layer and a float head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = IntTernaryConv2d(3, 4, 3)
        self.lin1 = IntTernaryLinear(40, 64)
        self.lin2 = IntTernaryLinear(64, 16, bias=False)
        self.frozen = IntTernaryLinear(16, 16)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin1(x)) + self.conv(img).mean()
        return self.head(self.frozen(torch.relu(self.lin2(h))))


def run(seed: int = 0, steps: int = STEPS, after_step=None, **kw) -> tuple[Net, ScaledOptum]:
    torch.manual_seed(seed)
    model = Net()
    opt = ScaledOptum.for_model(model, lr=0.01, threshold=3, ternary_lr=2.0, momentum=0.9,
                                momentum_decay=0.99, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(steps):
        opt.zero_grad()
        x, img = torch.randn(8, 40, generator=gen), torch.randn(2, 3, 5, 5, generator=gen)
        model(x, img).square().mean().backward()
        model.lin1.weight.grad.view(-1)[::5] = 0
        if i in NO_GRAD_STEPS:
            model.lin2.weight.grad = None
            model.head.bias.grad = None
        if i == 3:  # non-finite entries read as 0
            model.lin1.weight.grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"),
                                                                -float("inf")])
        opt.step()
        if after_step is not None:
            after_step(model)
        for group in opt.param_groups:
            group["lr"] *= 0.9
    return model, opt


def assert_identical(a: tuple[Net, ScaledOptum], b: tuple[Net, ScaledOptum]) -> None:
    (ma, oa), (mb, ob) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        assert oa.state.get(pa, {}).keys() == ob.state.get(pb, {}).keys()
        for key, value in oa.state.get(pa, {}).items():
            assert torch.equal(value, ob.state[pb][key]), key
    for module in (ma.conv, ma.lin1, ma.lin2):
        assert torch.equal(module.weight, module.effective_weight())


@pytest.mark.parametrize("kw", [{}, {"e_policy": "track", "maximize": True}])
def test_default_eager_step_matches_the_for_loop_exactly(kw):
    ref = run(foreach=False, **kw)
    fast = run(**kw)
    assert_identical(ref, fast)
    model = fast[0]
    assert int(model.lin1.step) == STEPS and int(model.lin2.step) == STEPS - len(NO_GRAD_STEPS)
    assert int(model.frozen.step) == 0 and not model.frozen.pressure.any()
    assert model.lin1.pressure.any() and model.lin1.corr_accum.any() and model.conv.step == STEPS
    torch.manual_seed(0)
    assert not torch.equal(model.lin1.T, Net().lin1.T)  # the run moved ternary weights


def test_the_default_step_in_blocks_of_rows_matches_the_for_loop(monkeypatch):
    monkeypatch.setattr(so, "_EAGER_BLOCK", 100)  # 1 to 3 rows per block
    kw = {"e_policy": "track"}
    assert_identical(run(foreach=False, **kw), run(**kw))


def replace_tensors(model: Net) -> None:
    """New storage for the buffers and the weight cache of every ternary layer (as ``.to()``
    and ``param.data = ...`` do): cached views must not write to the old one."""
    for layer in (model.conv, model.lin1, model.lin2):
        layer.T = layer.T.clone()
        layer.pressure = layer.pressure.clone()
        layer.weight.data = layer.weight.data.clone()


def test_the_default_step_follows_replaced_buffers():
    assert_identical(run(foreach=False, after_step=replace_tensors),
                     run(after_step=replace_tensors))


def fake_compile(fn, *args, key, device, scalars=(), **static):
    """``run_compiled`` without the compiler: the same function, run eagerly."""
    fn(*args, *[torch.tensor(float(x), dtype=torch.float64) for x in scalars], **static)


def test_the_compiled_step_function_matches_the_for_loop_when_run_eagerly(monkeypatch):
    monkeypatch.setattr(so, "run_compiled", fake_compile)
    kw = {"e_policy": "track", "maximize": True}
    assert_identical(run(foreach=False, **kw), run(fused=True, **kw))


def test_fused_none_compiles_from_the_size_threshold_on_cpu(monkeypatch):
    calls = []

    def record(fn, *args, **kw):
        calls.append(kw["key"])
        fake_compile(fn, *args, **kw)

    monkeypatch.setattr(so, "run_compiled", record)
    monkeypatch.setattr(fused_module, "cpu_compile_usable", lambda: True)
    run(steps=1)
    assert not calls  # a small model stays eager
    monkeypatch.setattr(fused_module, "CPU_MIN_NUMEL", 1000)
    model, _ = run(steps=1)
    assert len(calls) == 1 and model.lin1 in calls[0]
    calls.clear()
    run(steps=1, fused=False)
    run(steps=1, foreach=False)
    assert not calls


@pytest.mark.skipif(shutil.which("g++") is None or os.environ.get("CHIMERA_SLOW_TESTS") != "1",
                    reason="inductor needs g++ on CPU and its cold build takes ~30 s (set "
                           "CHIMERA_SLOW_TESTS=1); tests/optim/test_fused.py covers the compiled "
                           "step in CI")
def test_inductor_compiled_step_matches_the_for_loop_exactly():
    kw = {"e_policy": "track", "maximize": True}
    torch._dynamo.reset()
    assert_identical(run(foreach=False, steps=3, **kw), run(fused=True, steps=3, **kw))


def test_gradient_scales_clean_only_non_finite_gradients():
    good, bad = torch.tensor([1.0, -3.0]), torch.tensor([float("nan"), 2.0, -float("inf"), 0.0])
    grads, scales = gradient_scales([good, bad], 4.0)
    assert grads[0] is good and grads[1].tolist() == [0.0, 2.0, 0.0, 0.0]
    assert scales.tolist() == [2.0, 8.0]  # rate / mean|g|: 4 / 2, 4 / 0.5
    _, zero = gradient_scales([torch.zeros(3)], 4.0)
    assert torch.isfinite(zero).all()  # capped at float32's max: 0 * scale stays 0
    assert pressure_increment(torch.zeros(3), 1e30, 5).tolist() == [0, 0, 0]


def test_abs_sums_small_by_the_1_norm_large_by_chunks():
    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(3 * so._CHUNK + 5), torch.zeros(so._CHUNK + 1)]
    sums = abs_sums(grads)
    assert sums.dtype == torch.float32 and sums.shape == (3,)
    assert sums[0] == torch.linalg.vector_norm(grads[0], 1) and sums[2] == 0
    torch.testing.assert_close(sums[1].double(), grads[1].double().abs().sum(), rtol=1e-5,
                               atol=0)


def test_abs_sums_of_only_large_or_only_small_gradients():
    large = [torch.ones(so._CHUNK + 3), -torch.ones(2 * so._CHUNK)]
    assert abs_sums(large).tolist() == [so._CHUNK + 3, 2 * so._CHUNK]
    assert abs_sums([torch.full((4,), -2.0)]).tolist() == [8.0]
