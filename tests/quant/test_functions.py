import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chimera.quant.functions import (
    abs_stat,
    quantize_activations,
    quantize_weight_chimera,
    quantize_weight_strict_bitnet,
)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 200), gamma=st.floats(0.01, 3.0))
def test_strict_bitnet_equals_chimera_at_alpha_half(seed, n, gamma):
    u = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    # exact ties |u| = gamma/2 are where round-half-to-even and strict '>' could differ;
    # round(0.5) = 0 and 0.5 > 0.5 is False, so they agree there too
    u[0] = gamma / 2
    strict = quantize_weight_strict_bitnet(u, gamma)
    assert torch.equal(strict, quantize_weight_chimera(u, gamma, 0.5))


def test_quantizers_on_hand_values():
    u = torch.tensor([-2.0, -0.6, -0.5, 0.0, 0.3, 0.5, 0.51, 1.7])
    assert quantize_weight_strict_bitnet(u, 1.0).tolist() == [-1, -1, -0, 0, 0, 0, 1, 1]
    assert quantize_weight_chimera(u, 1.0, 0.4).tolist() == [-1, -1, -1, 0, 0, 1, 1, 1]
    assert quantize_weight_chimera(u, 1.0, 0.0).tolist() == [-1, -1, -1, 0, 1, 1, 1, 1]


@pytest.mark.parametrize(("fn", "arg", "err"), [
    (quantize_weight_strict_bitnet, [1.0], TypeError),
    (quantize_weight_strict_bitnet, torch.tensor([1, 2]), TypeError),
    (quantize_weight_strict_bitnet, torch.empty(0), ValueError),
])
def test_quantizer_input_errors(fn, arg, err):
    with pytest.raises(err):
        fn(arg, 1.0)


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), True])
def test_bad_alpha_rejected(alpha):
    with pytest.raises(ValueError, match=rf"^alpha must be a number >= 0, got {alpha!r}$"):
        quantize_weight_chimera(torch.ones(3), 1.0, alpha)


def test_abs_stat_modes():
    w = torch.tensor([-3.0, 1.0, 2.0])
    assert abs_stat(w).item() == pytest.approx(2.0)
    assert abs_stat(w, "median").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="stat_mode"):
        abs_stat(w, "max")


@pytest.mark.parametrize("mode", ["per_tensor", "per_token"])
def test_activation_quantization_values_and_straight_through_gradient(mode):
    x = torch.randn(4, 16, requires_grad=True)
    y = quantize_activations(x, mode)
    if mode == "per_tensor":
        beta = x.detach().abs().max() / 127 + 1e-6
    else:
        beta = x.detach().abs().amax(-1, keepdim=True) / 127 + 1e-6
    levels = y.detach() / beta
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= 127 + 1e-3
    assert (y - x).abs().max() <= beta.max() / 2 + 1e-6
    (y * torch.arange(16.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(16.0).expand(4, 16))


def test_activation_quantization_none_and_bad_mode():
    x = torch.randn(3)
    assert quantize_activations(x, "none") is x
    with pytest.raises(ValueError, match="act_quant"):
        quantize_activations(x, "per_channel")
