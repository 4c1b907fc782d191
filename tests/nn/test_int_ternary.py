"""Integer-ternary layers (docs/algorithms.md#scaledoptum, #integer-ternary-layers)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from chimera.nn.int_ternary import (
    IntTernaryConv1d,
    IntTernaryConv2d,
    IntTernaryLinear,
    IntTernaryModule,
)
from chimera.quant.functions import quantize_activations, quantize_weight_chimera


def backward_with_weight_grad(layer: IntTernaryLinear, g: torch.Tensor) -> None:
    """Run a training forward/backward whose dL/dW is exactly ``g`` (identity inputs)."""
    layer.train()
    y = layer(torch.eye(layer.in_features))  # y[b, o] = W[o, b] + bias[o]
    (y * g.T).sum().backward()


def test_buffers_dtypes_and_the_float_weight_is_a_cache_of_the_integer_state():
    layer = IntTernaryLinear(70, 5)
    buffers = dict(layer.named_buffers())
    assert {k: v.dtype for k, v in buffers.items()} == {
        "T": torch.int8, "E": torch.int8, "corr_accum": torch.int64, "step": torch.int64,
        "pressure": torch.int8,
    }
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert torch.equal(layer.weight, layer.effective_weight())  # a cache of W = T * S
    with torch.no_grad():
        layer.weight.fill_(3.0)
    state = layer.state_dict()
    fresh = IntTernaryLinear(70, 5)
    fresh.load_state_dict(state)  # the saved cache is ignored: W comes from the integer state
    assert torch.equal(fresh.weight, layer.effective_weight())
    del state["weight"]  # a checkpoint saved before the cache existed
    old = IntTernaryLinear(70, 5)
    result = old.load_state_dict(state)
    assert not result.missing_keys and torch.equal(old.weight, layer.effective_weight())
    assert set(layer.T.unique().tolist()) <= {-1, 0, 1}
    assert layer.E.shape == layer.corr_accum.shape == (5, 3)  # ceil(70 / 32) groups per row


def test_effective_weight_formula_and_step_zero():
    layer = IntTernaryLinear(4, 2, group_size=2, act_quant="none")
    with torch.no_grad():
        layer.T.copy_(torch.tensor([[1, -1, 0, 1], [-1, 1, 1, 0]]))
        layer.E.copy_(torch.tensor([[-1, 2], [0, -3]]))
        layer.corr_accum.copy_(torch.tensor([[3, -2], [0, 5]]))
    power = torch.tensor([[0.5, 4.0], [1.0, 0.125]])
    expected0 = layer.T.float() * power.repeat_interleave(2, dim=1)
    assert torch.equal(layer.effective_weight(), expected0)  # step == 0: S = 2^E
    layer.step.fill_(4)  # S = 2^E * (1 + corr / (step * gs))
    layer.sync_weight()  # the buffers were written directly
    s = power * (1 + torch.tensor([[3.0, -2.0], [0.0, 5.0]]) / 8)
    expected = layer.T.float() * s.repeat_interleave(2, dim=1)
    assert torch.allclose(layer.effective_weight(), expected, rtol=0, atol=1e-7)
    x = torch.randn(3, 4)
    assert torch.allclose(layer(x), x @ expected.T + layer.bias, atol=1e-6)


def test_padded_last_group_scales_only_its_columns():
    layer = IntTernaryLinear(70, 3)
    with torch.no_grad():
        layer.T.fill_(1)
        layer.E.copy_(torch.tensor([0, 1, 2]).expand(3, 3))
    w = layer.effective_weight()
    assert torch.equal(w[:, :32], torch.ones(3, 32))
    assert torch.equal(w[:, 32:64], torch.full((3, 32), 2.0))
    assert torch.equal(w[:, 64:], torch.full((3, 6), 4.0))


@pytest.mark.parametrize(
    "layer",
    [IntTernaryConv2d(4, 6, 3, groups=2, group_size=8), IntTernaryConv1d(3, 5, 3, group_size=4)],
    ids=["conv2d", "conv1d"],
)
def test_conv_groups_run_along_flattened_fan_in(layer):
    fan_in = math.prod(layer.T.shape[1:])  # (in/groups) * prod(kernel): 18 and 9
    num_groups = -(-fan_in // layer.group_size)
    assert layer.E.shape == (layer.out_channels, num_groups)
    with torch.no_grad():
        layer.T.fill_(1)
        layer.E.copy_(torch.arange(num_groups).expand_as(layer.E))
    rows = layer.effective_weight().reshape(layer.out_channels, -1)
    group_of_column = torch.arange(fan_in) // layer.group_size
    assert torch.equal(rows, torch.exp2(group_of_column.float()).expand_as(rows))


def test_forward_matches_functional_call_and_gradients_reach_input_and_bias():
    torch.manual_seed(0)
    conv = IntTernaryConv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = conv(x)
    ref = F.conv2d(quantize_activations(x), conv.effective_weight(), conv.bias, 2, 1)
    assert torch.equal(y, ref)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert conv.bias.grad is not None and conv.bias.grad.abs().sum() > 0
    assert conv.weight_grad.shape == conv.T.shape and conv.weight_grad.abs().sum() > 0


def test_weight_grad_is_dl_dw():
    torch.manual_seed(0)
    layer = IntTernaryLinear(6, 3, act_quant="none")
    x = torch.randn(5, 6)
    w = layer.effective_weight().requires_grad_(True)
    F.linear(x, w, layer.bias.detach()).tanh().sum().backward()
    layer(x).tanh().sum().backward()
    assert torch.allclose(layer.weight_grad, w.grad)


def test_update_corr_hand_computed_and_sign_convention():
    layer = IntTernaryLinear(4, 1, group_size=2, act_quant="none")
    with torch.no_grad():
        layer.T.copy_(torch.tensor([[1, 1, -1, 0]]))
    g = torch.tensor([[-0.5, 2.0, 3.0, 0.1]])  # descent_sign = [1, -1, -1, -1]
    # descent * T = [1, -1, 1, 0]: group sums [0, 1]; descent pushing outward counts +1
    for expected in ([[0, 1]], [[0, 2]]):
        backward_with_weight_grad(layer, g)
        assert layer.update_corr()
        layer.zero_grad()
        assert torch.equal(layer.corr_accum, torch.tensor(expected))
    assert layer.corr_accum.dtype == torch.int64 and int(layer.step) == 2
    outward = torch.tensor([[-1.0, -1.0, 1.0, 0.0]])  # every non-zero weight pushed outward
    backward_with_weight_grad(layer, outward)
    layer.update_corr()
    assert torch.equal(layer.corr_accum, torch.tensor([[2, 3]]))
    s = layer.group_scale() / torch.exp2(layer.E.float())
    assert torch.allclose(s, torch.tensor([[1 + 2 / 6, 1 + 3 / 6]]))
    assert not IntTernaryLinear(4, 1).update_corr()  # no gradient: no change


def test_update_corr_matches_grouped_sums_on_a_conv():
    torch.manual_seed(1)
    conv = IntTernaryConv2d(3, 2, 3, group_size=8)  # fan-in 27: groups 8, 8, 8, 3 (+5 padding)
    conv(torch.randn(2, 3, 5, 5)).sum().backward()
    descent = -torch.sign(conv.weight_grad).reshape(2, 27) * conv.T.reshape(2, 27)
    expected = torch.stack([F.pad(descent, (0, 5))[:, i:i + 8].sum(1) for i in (0, 8, 16, 24)], 1)
    conv.update_corr()
    assert torch.equal(conv.corr_accum, expected.long())


def test_update_ternary_pressure_rule():
    layer = IntTernaryLinear(4, 1)
    with torch.no_grad():
        layer.T.copy_(torch.tensor([[0, 1, -1, 1]]))
    inc = torch.tensor([[1, -1, -1, 1]], dtype=torch.int16)
    layer.update_ternary(inc, threshold=2)
    assert layer.T.tolist() == [[0, 1, -1, 1]] and layer.pressure.tolist() == [[1, -1, -1, 1]]
    layer.update_ternary(inc, threshold=2)  # |pressure| reaches 2: one step toward its sign
    assert layer.T.tolist() == [[1, 0, -1, 1]]  # -1 and +1 cannot go further: clamped
    assert layer.pressure.tolist() == [[0, 0, 0, 0]]  # every fired counter resets
    layer.update_ternary(torch.tensor([[5, 0, 0, -3]], dtype=torch.int16), threshold=2)
    assert layer.T.tolist() == [[1, 0, -1, 0]] and layer.pressure.dtype == torch.int8
    for bad in (0, 128, True, 2.5):
        with pytest.raises(ValueError, match="threshold"):
            layer.update_ternary(inc, threshold=bad)


def test_rebalance_exponent_shifts_e_and_keeps_scale():
    layer = IntTernaryLinear(8, 1, group_size=2)
    layer.step.fill_(10)  # n = step * gs = 20
    with torch.no_grad():
        layer.E.zero_()
        layer.corr_accum.copy_(torch.tensor([[10, -7, 0, -20]]))  # f = 1.5, 0.65, 1, 0
    before = layer.group_scale()
    layer.rebalance_exponent()
    assert layer.E.tolist() == [[1, -1, 0, 0]]  # f = 0 (S = 0) keeps its exponent
    assert layer.corr_accum.tolist() == [[-5, 6, 0, -20]]  # f -> 0.75, 1.3, 1, 0
    assert torch.allclose(layer.group_scale(), before)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 1000), st.floats(0.34, 2.0), st.integers(-5, 5))
def test_rebalance_keeps_scale_up_to_rounding_and_factor_in_band(step, f, e):
    layer = IntTernaryLinear(2, 1, group_size=2)
    n = step * 2
    layer.step.fill_(step)
    with torch.no_grad():
        layer.E.fill_(e)
        layer.corr_accum.fill_(round((f - 1) * n))
    assume(1 / 3 <= 1 + layer.corr_accum.item() / n <= 2)  # integer rounding can leave [1/3, 2]
    before = layer.group_scale()
    layer.rebalance_exponent()
    after = layer.group_scale()
    assert abs(after.item() - before.item()) <= 2.0 ** (e + 1) / n + 1e-6 * before.item()
    factor = after.item() / 2.0 ** layer.E.item()
    assert 2 / 3 - 1 / (2 * n) - 1e-9 <= factor < 1.5  # one shift brings f from [1/3, 2] in


def test_eval_and_no_grad_forwards_mutate_nothing():
    torch.manual_seed(0)
    layer = IntTernaryLinear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    layer.update_corr()
    layer.zero_grad()
    snapshot = copy.deepcopy(layer.state_dict())
    layer.eval()
    y = layer(x)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in snapshot.items())
    y.sum().backward()  # as in nn.Linear, eval mode still differentiates
    assert layer.weight_grad is not None
    layer.zero_grad()
    layer.train()
    with torch.no_grad():
        layer(x)
    assert not layer.update_corr()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in snapshot.items())


def test_get_last_stats():
    layer = IntTernaryLinear(10, 3)
    assert layer.get_last_stats() is None
    with torch.no_grad():
        layer.T.copy_(torch.tensor([0, 0, 1, -1, 1, 0, 0, 1, 1, -1]).repeat(3, 1))
    layer(torch.randn(2, 10))
    stats = layer.get_last_stats()
    assert stats["num_weights"] == 30
    assert stats["zero_ratio"] == pytest.approx(0.4) and stats["plus_ratio"] == pytest.approx(0.4)
    assert stats["minus_ratio"] == pytest.approx(0.2)
    h = -(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2))
    assert stats["effective_bits"] == pytest.approx(h)
    assert stats["gamma"] == pytest.approx(layer.group_scale().mean().item())


@pytest.mark.parametrize(
    ("make", "input_shape"),
    [
        (lambda: nn.Linear(40, 6), (40,)),
        (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=1), (3, 12)),
        (lambda: nn.Conv2d(4, 6, 3, groups=2), (4, 7, 7)),
    ],
    ids=["linear", "conv1d", "conv2d"],
)
def test_from_float(make, input_shape):
    torch.manual_seed(0)  # the float weights too: the cosine bound below holds for these seeds
    float_layer = make()
    layer = IntTernaryModule.from_float(float_layer, group_size=16)
    assert type(layer)._FLOAT_TYPE is type(float_layer) and layer.group_size == 16
    assert type(type(layer).from_float(float_layer)) is type(layer)
    w = float_layer.weight.detach()
    t = quantize_weight_chimera(w, w.abs().mean(), 0.7)
    assert torch.equal(layer.T, t.to(torch.int8))
    assert torch.equal(layer.bias.detach(), float_layer.bias.detach())
    # per group: E = round(log2(mean |w| over the non-zero T of the group))
    rows_w, rows_t = w.reshape(w.shape[0], -1).abs(), t.reshape(w.shape[0], -1).abs()
    first = (rows_w[:, :16] * rows_t[:, :16]).sum(1) / rows_t[:, :16].sum(1)
    assert torch.equal(layer.E[:, 0], torch.log2(first).round().to(torch.int8))
    x = torch.randn(2, *input_shape)
    y_float, y_int = float_layer(x), layer(x)
    assert y_int.shape == y_float.shape
    assert F.cosine_similarity(y_int.flatten(), y_float.flatten(), dim=0) > 0.8


def test_from_float_rejects_other_modules():
    with pytest.raises(TypeError, match="Conv2d"):
        IntTernaryLinear.from_float(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError):
        IntTernaryModule.from_float(nn.ReLU())
    with pytest.raises(ValueError, match="padding_mode"):
        IntTernaryConv2d.from_float(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    no_bias = IntTernaryConv1d.from_float(nn.Conv1d(2, 2, 3, bias=False))
    assert no_bias.bias is None and no_bias(torch.randn(1, 2, 5)).shape == (1, 2, 3)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: IntTernaryLinear(4, 2, group_size=0), "group_size"),
        (lambda: IntTernaryLinear(4, 2, act_quant="int4"), "act_quant"),
        (lambda: IntTernaryLinear(0, 2), "in_features must be an integer >= 1, got 0"),
        (lambda: IntTernaryConv2d(3, 4, 3, groups=2), "groups"),
        (lambda: IntTernaryLinear(4, 2, group_size=math.inf), "group_size must be an integer"),
    ],
)
def test_invalid_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_non_finite_gradient_entries_count_as_zero():
    layer = IntTernaryLinear(2, 1, group_size=2, act_quant="none")
    with torch.no_grad():
        layer.T.fill_(1)
    layer(torch.randn(1, 2)).sum().backward()
    layer.weight.grad = torch.tensor([[float("nan"), -1.0]])  # an entry-wise NaN
    assert layer.weight_grad.tolist() == [[0.0, -1.0]]
    layer.update_corr()
    assert layer.corr_accum.tolist() == [[1]]


@pytest.mark.parametrize(("layer", "float_layer", "shape"), [
    (lambda: IntTernaryLinear(6, 4, group_size=4), nn.Linear(6, 4), (0, 6)),
    (lambda: IntTernaryLinear(6, 4, bias=False, act_quant="per_token"), nn.Linear(6, 4),
     (2, 0, 6)),
    (lambda: IntTernaryConv1d(2, 4, 3, padding=1), nn.Conv1d(2, 4, 3, padding=1), (0, 2, 7)),
    (lambda: IntTernaryConv2d(2, 4, 3, groups=2), nn.Conv2d(2, 4, 3, groups=2), (0, 2, 5, 5)),
])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_behaves_like_the_float_layer_and_changes_no_state(layer, float_layer, shape,
                                                                         training):
    layer = layer().train(training)
    full = (2, *shape[1:]) if shape[0] == 0 else (shape[0], 1, *shape[2:])
    y0 = layer(torch.randn(full))  # a first, non-empty forward (and its dL/dW in training)
    if y0.requires_grad:
        y0.sum().backward()
    grad, stats = layer.weight.grad, layer.get_last_stats()
    grad = None if grad is None else grad.clone()
    buffers = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == float_layer(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    if layer.bias is not None:
        assert layer.bias.grad is not None
    assert layer.get_last_stats() == stats
    assert (layer.weight.grad is None) == (grad is None)  # no dL/dW from an empty batch
    assert grad is None or torch.equal(layer.weight.grad, grad)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in buffers.items())
