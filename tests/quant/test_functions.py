import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chimera.quant.functions import (
    abs_stat,
    ema_update,
    quantize_activations,
    quantize_weight_chimera,
    quantize_weight_strict_bitnet,
    scaled_ternary,
    stat_of_magnitudes,
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_tensor_alpha_gives_the_float_alpha_result_bit_for_bit(dtype):
    """A float64 0-dim alpha (the layers' device-side schedule) and the same Python float give
    the same T, also for weights on the threshold's last bits."""
    gamma = torch.tensor(0.37, dtype=dtype)
    for k in range(1, 60):
        alpha = 0.3 + 0.8 * k / 59  # warm-up style values, most not representable in float32
        threshold = (alpha * gamma).to(dtype)
        u = threshold * torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=dtype)
        u = torch.cat([u, torch.nextafter(u, torch.zeros_like(u)),
                       torch.nextafter(u, 2 * u), torch.randn(50, dtype=dtype)])
        expected = quantize_weight_chimera(u, gamma, alpha)
        got = quantize_weight_chimera(u, gamma, torch.tensor(alpha, dtype=torch.float64))
        assert torch.equal(got, expected), (dtype, alpha)
    assert expected.dtype == got.dtype == dtype


@pytest.mark.parametrize("mode", ["per_tensor", "per_token"])
def test_activation_quantization_without_ste_has_the_same_value_and_no_input_gradient(mode):
    x = torch.randn(8, 64, requires_grad=True)
    with_ste, without = quantize_activations(x, mode), quantize_activations(x, mode, ste=False)
    assert torch.equal(with_ste, without)
    without.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # round has derivative 0 (the original's)


def test_ema_update():
    old, new = torch.tensor(2.0), torch.tensor(4.0)
    assert ema_update(old, new, 0.75).item() == 2.5 and old.item() == 2.0  # a new tensor
    assert ema_update(old, new, 1.0).item() == 2.0 and ema_update(old, new, 0.0).item() == 4.0
    for rho in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^rho must be a number in \[0, 1\], got"):
            ema_update(old, new, rho)


def activation_formula(x, mode, eps_beta=1e-6):
    """The activation quantizer as first written (abs, max, out-of-place steps)."""
    amax = x.detach().abs().max() if mode == "per_tensor" else (
        x.detach().abs().amax(dim=-1, keepdim=True))
    beta = amax / 127 + eps_beta
    x_q = torch.clamp(torch.round(x.detach() / beta), -127, 127)
    return x + (beta * x_q - x).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["per_tensor", "per_token"])
def test_activation_quantizer_passes_equal_the_formula_bit_for_bit(mode, dtype):
    """aminmax and in-place steps: same values (NaN rows and all-zero rows included) and the
    same straight-through gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 33, dtype=dtype) * torch.logspace(-3, 3, 33, dtype=dtype)
    x[0, 1] = 0.0
    x[0, 2] = -0.0
    x[2, 3, 5] = float("nan")
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = quantize_activations(a, mode), activation_formula(b, mode)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0, equal_nan=True)
    numbers = ~ya.isnan()  # the sign bit of a NaN means nothing
    assert torch.equal(ya.signbit()[numbers], yb.signbit()[numbers])
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_stat_of_magnitudes_is_abs_stat_of_w():
    w = torch.randn(7, 9)
    for mode in ("mean", "median"):
        assert torch.equal(stat_of_magnitudes(w.abs(), mode), abs_stat(w, mode))
    with pytest.raises(ValueError, match="^stat_mode must be"):
        stat_of_magnitudes(w.abs(), "max")


def test_scaled_ternary_rejects_an_unknown_quantizer():
    u = torch.randn(4)
    with pytest.raises(ValueError, match="^quant_mode must be 'chimera' or 'strict_bitnet'"):
        scaled_ternary(u, torch.tensor(1.0), 0.5, "sign", out=torch.empty_like(u))
