"""The eager fast path of the Bit layers (few passes over W, in-place buffers) and the eval
cache of the weight operand, against the ground-truth formula (docs/algorithms.md#bit-layers):
outputs, gradients, buffers and statistics bit for bit."""

import copy

import pytest
import torch
from torch import nn

from chimera.nn import bit_layers
from chimera.nn.bit_layers import BitConv1d, BitConv2d, BitLayer, BitLinear, fast_weight_operand
from chimera.quant.stats import ternary_stats

CASES = {
    "linear-chimera": (lambda **kw: BitLinear(12, 5, warmup_steps=3, **kw), (4, 12)),
    "linear-strict-per_token-median": (
        lambda **kw: BitLinear(12, 5, quant_mode="strict_bitnet", act_quant="per_token",
                               stat_mode="median", **kw), (2, 3, 12)),
    "linear-clip0.5-fallback": (lambda **kw: BitLinear(12, 5, ste_clip=0.5, **kw), (4, 12)),
    "linear-bfloat16-fallback": (lambda **kw: BitLinear(12, 5, **kw).bfloat16(), (4, 12)),
    "conv1d-noclip-nobias": (
        lambda **kw: BitConv1d(3, 4, 3, stride=2, bias=False, ste_clip=None, **kw), (2, 3, 9)),
    "conv2d-noact-float64": (
        lambda **kw: BitConv2d(2, 4, 3, padding=1, groups=2, act_quant="none",
                               **kw).double(), (2, 2, 5, 5)),
}


def reference(layer: BitLayer) -> BitLayer:
    """A twin whose every forward is the ground-truth formula (``quantized_operands``)."""
    twin = copy.deepcopy(layer)
    twin.forward = twin._traced_forward
    return twin


def observe(layer: BitLayer, y: torch.Tensor, x: torch.Tensor) -> dict:
    return {"y": y.detach(), "x_grad": x.grad,
            **{f"{n}_grad": p.grad for n, p in layer.named_parameters()},
            **{n: b.clone() for n, b in layer.named_buffers()},
            "stats": layer.get_last_stats()}


def assert_same(a: dict, b: dict, where) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "stats":
            assert a[key] == b[key], where
        elif a[key] is None or b[key] is None:
            assert a[key] is b[key] is None, (where, key)
        else:  # bit for bit, signed zeros included
            assert torch.equal(a[key], b[key]), (where, key)
            assert torch.equal(a[key].signbit(), b[key].signbit()), (where, key)


def train(layer: BitLayer, shape, steps: int, seed: int = 0, stats_every: int = 2) -> list[dict]:
    """Forward, backward, SGD step; stats read on some steps only (they are lazy)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = layer.weight_master.dtype
    snaps = []
    for step in range(steps):
        x = (torch.randn(shape, generator=gen, dtype=dtype) * (1 + step)).requires_grad_(True)
        y = layer(x)
        y.backward(torch.randn(y.shape, generator=gen, dtype=dtype))
        snap = observe(layer, y, x)
        if step % stats_every:
            snap.pop("stats")
        snaps.append(snap)
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.05 * p.grad
                p.grad = None
    return snaps


@pytest.mark.parametrize("case", CASES)
def test_eager_fast_path_equals_the_formula_bit_for_bit(case, monkeypatch):
    """Training steps over the warm-up (alpha changes), then eval forwards with and without
    gradients: outputs, W/bias/x gradients, scale EMA, step counter and statistics."""
    routes = []

    def recording(*a, **kw):
        gamma, q = fast_weight_operand(*a, **kw)
        routes.append(q is not None)
        return gamma, q

    monkeypatch.setattr(bit_layers, "fast_weight_operand", recording)
    make, shape = CASES[case]
    torch.manual_seed(0)
    fast = make(compiled=False)
    with torch.no_grad():  # a scale EMA away from mean|W|, so the EMA update is visible
        fast.weight_master.mul_(1.3)
    ref = reference(fast)
    for step, (a, b) in enumerate(zip(train(ref, shape, 5), train(fast, shape, 5), strict=True)):
        assert_same(a, b, step)
    ref.eval()
    fast.eval()
    x = torch.randn(shape, dtype=fast.weight_master.dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y_fast = ref(x), fast(x2)  # eval with a weight gradient: no cache
    y_ref.sum().backward()
    y_fast.sum().backward()
    assert_same(observe(ref, y_ref, x), observe(fast, y_fast, x2), "eval+grad")
    with torch.no_grad():
        assert torch.equal(ref(x), fast(x))
    assert ref.get_last_stats() == fast.get_last_stats()
    assert routes == [not case.endswith("fallback")] * 7  # 5 steps, eval+grad, cached eval


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("quant_mode", ["chimera", "strict_bitnet"])
def test_scaled_ternary_is_gamma_times_t_with_positive_zeros(dtype, quant_mode):
    """Ties (``|U| == alpha * gamma``, ``U / gamma == ±0.5``) and zeros of both signs."""
    from chimera.quant.functions import scaled_ternary

    gamma, alpha = torch.tensor(0.25, dtype=dtype), torch.tensor(0.5, dtype=torch.float64)
    ties = torch.tensor([0.125, -0.125, 0.0, -0.0, 0.375, -0.375, 1e-30, 3e4], dtype=dtype)
    u = torch.cat([ties, torch.randn(1000, dtype=dtype) * 0.3])
    t = bit_layers.WEIGHT_QUANTIZERS[quant_mode](u, gamma, alpha)
    q = scaled_ternary(u, gamma, alpha, quant_mode, out=torch.empty_like(u))
    expected = gamma * (u + (t - u))  # the layer's gamma * w_ste
    assert torch.equal(q, expected) and torch.equal(q.signbit(), expected.signbit())
    assert not q.signbit()[t == 0].any()


@pytest.mark.parametrize("bad", [2.0**24, float("inf"), float("nan")])
def test_weights_where_the_formula_differs_take_the_formula(bad):
    """``W + (T - W)`` is T only for finite ``|W| < 2^24`` (float32): other weights leave
    the fast route, in training (mean bound) and in eval (max bound)."""
    torch.manual_seed(3)
    fast = BitLinear(6, 4, compiled=False)
    with torch.no_grad():
        fast.weight_master[1, 2] = bad
    ref = reference(fast)
    for training in (False, True):
        ref.train(training)
        fast.train(training)
        x = torch.randn(3, 6)
        y_ref, y_fast = ref(x), fast(x)
        torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=0, equal_nan=True)
        assert ref.get_last_stats() == fast.get_last_stats() or bad != bad
    w = fast.weight_master.detach()
    gamma, q = fast_weight_operand(
        w, fast.scale_ema.clone(), update_ema=False, rho_s=0.9, stat_mode="mean",
        eps_gamma=1e-6, alpha=fast.alpha_tensor(), quant_mode="chimera", ste_clip=1.0)
    assert q is None


def test_weight_used_twice_and_gradient_accumulation_over_two_forwards():
    """Two forwards before one backward (the weight buffer must not be reused while a graph
    holds it), a layer applied twice in one graph, retain_graph and create_graph."""
    torch.manual_seed(4)
    fast = BitLinear(8, 8, warmup_steps=3, compiled=False)
    ref = reference(fast)
    for layer in (ref, fast):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        first, second = layer(x), layer(x * 2)
        (first.square().sum() + layer(second).sum()).backward(retain_graph=True)
        first.sum().backward()
        (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        g.sum().backward()
    assert_same(observe(ref, first, x), observe(fast, first, x), "grads")
    for (name, a), b in zip(ref.named_parameters(), fast.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_the_buffer_of_the_last_forward_is_reused_only_when_free():
    torch.manual_seed(5)
    layer = BitLinear(16, 8, compiled=False)
    x = torch.randn(2, 16, requires_grad=True)
    layer(x).sum().backward()
    spare = layer._spare
    layer(x).sum().backward()  # the graph is gone: the same buffer again
    assert layer._spare is spare
    y = layer(x)  # its graph holds this buffer: the next forward takes a new one
    held = layer._spare
    layer(x)
    assert layer._spare is not held
    y.sum().backward()


# -- the eval cache --------------------------------------------------------------------------
def counting(monkeypatch) -> dict:
    """Count weight-operand computations and ternary counts."""
    calls = {"operand": 0, "counts": 0}
    operand, counts = bit_layers.fast_weight_operand, bit_layers.sign_counts

    def fake_operand(*a, **kw):
        calls["operand"] += 1
        return operand(*a, **kw)

    def fake_counts(q):
        calls["counts"] += 1
        return counts(q)

    monkeypatch.setattr(bit_layers, "fast_weight_operand", fake_operand)
    monkeypatch.setattr(bit_layers, "sign_counts", fake_counts)
    return calls


def test_eval_reuses_the_weight_operand_and_counts_stats_once_on_request(monkeypatch):
    calls = counting(monkeypatch)
    torch.manual_seed(6)
    layer = BitLinear(16, 8, warmup_steps=4).eval()
    ref = reference(layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        outputs = [layer(x) for _ in range(3)]
    assert calls == {"operand": 1, "counts": 0}
    assert all(torch.equal(y, ref(x)) for y in outputs)
    stats = layer.get_last_stats()
    t = layer.quantize_weight()
    assert stats == ref.get_last_stats()
    assert {k: stats[k] for k in ("zero_ratio", "plus_ratio", "minus_ratio")} == {
        k: v for k, v in ternary_stats(t).items() if k != "effective_bits"}
    with torch.no_grad():
        layer(x)
    assert layer.get_last_stats() == stats and calls == {"operand": 1, "counts": 1}
    with torch.inference_mode():
        layer(x)
    layer.weight_master.requires_grad_(False)
    layer(x)  # grad mode, but no weight gradient: cached
    assert calls == {"operand": 1, "counts": 1}


CHANGES = {
    "optimizer step": lambda m: torch.optim.SGD(m.parameters(), lr=0.1).step(),
    "load_state_dict": lambda m: m.load_state_dict(
        {k: v * 1.1 if k == "weight_master" else v for k, v in m.state_dict().items()}),
    "load_state_dict assign": lambda m: m.load_state_dict(
        {k: v.clone() * 0.9 if k == "weight_master" else v for k, v in m.state_dict().items()},
        assign=True),
    "alpha_override": lambda m: setattr(m, "alpha_override", 0.9),
    "alpha_target": lambda m: setattr(m, "alpha_target", 1.2),
    "alpha_min": lambda m: setattr(m, "alpha_min", 0.6),
    "warmup_steps": lambda m: setattr(m, "warmup_steps", 2),
    "forward_step": lambda m: m.forward_step.fill_(2),
    "quant_mode": lambda m: setattr(m, "quant_mode", "strict_bitnet"),
    "eps_gamma": lambda m: setattr(m, "eps_gamma", 0.5),
    "ste_clip": lambda m: setattr(m, "ste_clip", 0.5),
    "reset_scale": lambda m: m.reset_scale(),
    "scale_ema": lambda m: m.scale_ema.mul_(2),
    "to float64": lambda m: m.double(),
    "new Parameter": lambda m: setattr(m, "weight_master",
                                       nn.Parameter(m.weight_master.detach() * 1.5)),
    "train step": lambda m: m.train()(torch.randn(2, 16)).sum().backward(),
}


@pytest.mark.parametrize("change", CHANGES)
def test_eval_cache_is_never_stale(change):
    """After each change the eval output and stats equal the formula's, bit for bit."""
    torch.manual_seed(7)
    layer = BitLinear(16, 8, alpha_min=0.2, warmup_steps=6).eval()
    layer.forward_step.fill_(1)
    layer.scale_ema.mul_(1.5)  # not abs_stat(W), so that reset_scale changes it
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
    layer.get_last_stats()
    layer.weight_master.grad = torch.randn_like(layer.weight_master)
    CHANGES[change](layer)
    layer.eval()
    ref = reference(layer)
    with torch.no_grad():
        y = layer(x.to(layer.weight_master.dtype))
        assert torch.equal(y, ref(x.to(layer.weight_master.dtype)))
    assert not torch.equal(y.float(), before) or change in ("forward_step", "train step")
    assert layer.get_last_stats() == ref.get_last_stats()


def test_cache_made_in_inference_mode_serves_autograd_outside_it():
    """An inference tensor cannot be saved for backward: outside inference mode the operand is
    computed again (a frozen weight, an input that needs a gradient)."""
    torch.manual_seed(8)
    layer = BitLinear(16, 8).eval().requires_grad_(False)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        expected = layer(x)
    x.requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(y, expected) and x.grad is not None
    assert not layer.cached_weight()[0].is_inference()


def test_copies_do_not_share_the_cache_and_clear_weight_cache():
    torch.manual_seed(9)
    layer = BitLinear(16, 8).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        assert twin._weight_cache is None
        twin.weight_master.mul_(-1)
        assert torch.equal(twin(x), reference(twin)(x))
        layer.weight_master.data.mul_(-1)  # bypasses the version counter
        layer.clear_weight_cache()
        assert torch.equal(layer(x), reference(layer)(x))


@pytest.mark.parametrize("training", [True, False])
def test_torch_func_transforms_run_the_formula(training):
    """vmap over inputs (no autograd.Function, cache or in-place chain inside a transform)."""
    torch.manual_seed(10)
    layer = BitLinear(6, 4, act_quant="per_token").train(training)
    x = torch.randn(3, 1, 6)
    ref = reference(layer)
    y = torch.func.vmap(layer)(x)
    assert int(layer.forward_step) == int(training)
    torch.testing.assert_close(y, torch.stack([ref(xi) for xi in x]))
