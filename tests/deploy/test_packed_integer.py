"""Packed layers' two forward paths (chimera.deploy.packed): the integer kernel against its
formula and the float path, the float path's cached weight, and every fallback."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import chimera.deploy.packed as packed
from chimera.deploy.packed import (
    INTEGER_TOLERANCE,
    PackedTernaryConv2d,
    PackedTernaryLinear,
    int8_activations,
    round_float32,
)
from chimera.quant.functions import quantize_activations


def linear(fan_in=37, out=11, seed=0, **kwargs) -> PackedTernaryLinear:
    torch.manual_seed(seed)
    layer = PackedTernaryLinear(fan_in, out, **kwargs)
    layer.T.copy_(torch.randint(-1, 2, layer.T.shape))
    layer.scale.copy_(torch.rand(layer.scale.shape) * 0.1 + 0.01)
    if layer.bias is not None:
        layer.bias.normal_()
    return layer


def float_reference(layer, x):
    """The float path computed afresh: ``F.linear(quantize_activations(x), weight(), bias)``."""
    x_q = quantize_activations(x, layer.act_quant, layer.eps_beta)
    return F.linear(x_q, layer.weight().to(x.dtype), layer.bias)


def integer_reference(layer, x):
    """The integer path's formula with an int64 sum: ``((x_q @ T^T) * s) * beta + bias``."""
    x_q, beta = int8_activations(x, layer.act_quant, layer.eps_beta)
    unit = torch.ones(()) if layer.clip is None else torch.ones(()).clamp(-layer.clip, layer.clip)
    acc = (x_q.reshape(-1, layer.in_features).long() @ layer.T.long().t()).float()
    y = acc * (layer.scale * unit) * beta.reshape(-1, 1)
    y = y if layer.bias is None else y + layer.bias
    return y.reshape(*x.shape[:-1], layer.out_features)


KERNELS = ["int_mm", *(["onednn"] if packed.INTEGER_KERNEL == "onednn" else [])]
CASES = [  # (layer kwargs, input shape)
    ({}, (1, 37)), ({"act_quant": "per_token"}, (5, 37)), ({"clip": 0.7}, (2, 3, 37)),
    ({"clip": 2.0, "bias": False}, (4, 37)), ({"act_quant": "per_token", "clip": 0.3}, (3, 2, 37)),
    ({"act_quant": "per_token"}, (37,)),
]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Each integer kernel torch offers here."""
    monkeypatch.setattr(packed, "INTEGER_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize(("kwargs", "shape"), CASES)
def test_integer_path_is_its_formula_exactly_and_within_the_bound_of_the_float_path(
        kwargs, shape, kernel):
    for seed in range(3):
        layer = linear(seed=seed, **kwargs)
        x = torch.randn(shape) * 3
        assert layer.integer_kernel_applies(x)
        y = layer(x)
        assert torch.equal(y, integer_reference(layer, x)) and y.is_contiguous()
        assert "float" not in layer._caches  # the integer path keeps no float weight
        assert ("onednn" in layer._caches) == (kernel == "onednn")
        expected = float_reference(layer, x)
        x_q = quantize_activations(x, layer.act_quant, layer.eps_beta)
        bias = 0 if layer.bias is None else layer.bias.abs()
        magnitude = x_q.abs() @ layer.weight().abs().t() + bias
        bound = (layer.in_features + 3) * INTEGER_TOLERANCE * magnitude
        assert ((y - expected).abs() <= bound).all()
        layer.exact = True
        assert torch.equal(layer(x), expected)


def test_integer_path_on_a_wide_layer_is_close_to_the_float_path(kernel):
    layer = linear(fan_in=1024, out=64, seed=1)
    x = torch.randn(3, 1024)
    y, expected = layer(x), float_reference(layer, x)
    assert torch.equal(y, integer_reference(layer, x))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_round_float32_is_torch_round():
    v = torch.cat([torch.arange(-300, 301) / 2, torch.randn(10_000) * 200,
                   torch.tensor([2.0**22 - 0.5, -(2.0**22) + 0.5, 0.49999997, -0.0])])
    expected = torch.round(v)
    assert torch.equal(round_float32(v.clone()), expected)  # up to the sign of zero


@pytest.mark.parametrize("mode", ["per_tensor", "per_token"])
def test_int8_activations_give_quantize_activations_values(mode):
    x = torch.randn(4, 9, 33) * torch.logspace(-3, 3, 33)
    x_q, beta = int8_activations(x, mode, 1e-6)
    assert x_q.dtype == torch.int8 and x_q.abs().max() <= 127
    assert torch.equal(beta * x_q, quantize_activations(x, mode, 1e-6, ste=False))


@pytest.mark.parametrize(("kwargs", "make_x"), [
    ({"act_quant": "none"}, lambda: torch.randn(3, 37)),
    ({"group_size": 8}, lambda: torch.randn(3, 37)),
    ({}, lambda: torch.randn(3, 37, dtype=torch.float64)),
    ({}, lambda: torch.tensor([[float("nan")] + [1.0] * 36, [float("inf")] + [0.5] * 36])),
])
def test_where_the_integer_kernel_does_not_apply_the_float_path_runs(kwargs, make_x):
    layer = linear(**kwargs)
    x = make_x()
    if x.dtype == torch.float64:
        layer.double()
    torch.testing.assert_close(layer(x), float_reference(layer, x), rtol=0, atol=0,
                               equal_nan=True)
    assert "float" in layer._caches


def test_input_that_asks_for_a_gradient_takes_the_float_path_and_gets_it():
    layer = linear()
    x = torch.randn(4, 37, requires_grad=True)
    assert not layer.integer_kernel_applies(x)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    float_reference(layer, x_ref).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    with torch.no_grad():
        assert layer.integer_kernel_applies(x)
        assert torch.equal(layer(x), integer_reference(layer, x))


def test_cached_float_weight_follows_every_change_of_the_buffers():
    layer = linear(exact=True)
    x = torch.randn(3, 37)

    def check():
        assert torch.equal(layer(x), float_reference(layer, x))

    check()
    cached = layer._caches["float"][3]
    check()
    assert layer._caches["float"][3] is cached  # reused while T and scale are unchanged
    layer.T.neg_()
    check()
    layer.scale.mul_(3)
    check()
    layer.load_state_dict(linear(seed=5).state_dict())
    check()
    layer.clip = 0.5
    check()
    layer.T = torch.randint(-1, 2, layer.T.shape, dtype=torch.int8)  # a new buffer
    check()
    layer.double()
    assert not layer._caches
    x = x.double()
    check()
    with torch.inference_mode():
        check()
    check()  # the inference-mode W is not reused outside inference mode
    assert set(layer.state_dict()) == {"T", "scale", "bias"}
    clone = copy.deepcopy(layer)
    clone.T.zero_()
    assert torch.equal(clone(x), float_reference(clone, x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # the whole module pickles with a cached W
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), layer(x))


def test_layers_built_in_inference_mode_take_the_float_path_uncached():
    with torch.inference_mode():
        layer = linear(act_quant="none")
        x = torch.randn(2, 37)
        assert torch.equal(layer(x), float_reference(layer, x))
        assert not layer._caches


def test_convolutions_take_the_float_path_in_both_modes():
    torch.manual_seed(0)
    conv = PackedTernaryConv2d(2, 4, 3, padding=1)
    conv.T.copy_(torch.randint(-1, 2, conv.T.shape))
    conv.scale.fill_(0.05)
    x = torch.randn(2, 2, 5, 5)
    expected = F.conv2d(quantize_activations(x), conv.weight(), conv.bias, padding=1)
    assert torch.equal(conv(x), expected)
    conv.exact = True
    assert torch.equal(conv(x), expected)


def test_exact_must_be_a_bool():
    with pytest.raises(ValueError, match="^exact must be True or False, got 1$"):
        PackedTernaryLinear(3, 2, exact=1)
    layer = PackedTernaryLinear(3, 2)
    with pytest.raises(ValueError, match="^exact must be True or False, got None$"):
        layer.exact = None
    assert "exact" not in layer.config()


def test_traces_take_the_float_path():
    layer = linear()
    x = torch.randn(3, 37)
    exported = torch.export.export(layer, (x,)).module()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    expected = float_reference(layer, x)
    assert torch.equal(exported(x), expected) and torch.equal(compiled(x), expected)


def test_integer_path_follows_every_change_of_the_buffers(kernel):
    layer = linear(clip=0.8)
    x = torch.randn(2, 37)

    def check():
        assert torch.equal(layer(x), integer_reference(layer, x))

    check()
    layer.T.neg_()
    check()
    layer.scale.mul_(3)
    check()
    layer.clip = None
    check()
    layer.load_state_dict(linear(seed=7).state_dict())
    check()
    layer.T = torch.randint(-1, 2, layer.T.shape, dtype=torch.int8)
    check()


def test_integer_path_under_inference_mode_and_after_it(kernel):
    layer = linear()
    x = torch.randn(2, 37)
    with torch.inference_mode():
        assert torch.equal(layer(x), integer_reference(layer, x))
    with torch.no_grad():
        assert torch.equal(layer(x), integer_reference(layer, x))
