import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chimera.nn.bit_layers import BitConv1d, BitConv2d, BitLinear
from chimera.quant.functions import quantize_activations, quantize_weight_chimera
from chimera.quant.stats import ternary_stats

# (layer factory, input shape, float op applied to (x, weight, bias))
GEOMETRIES = {
    "linear": (lambda **kw: BitLinear(6, 4, **kw), (3, 6), F.linear),
    "conv1d": (lambda **kw: BitConv1d(2, 4, 3, stride=2, padding=1, **kw), (3, 2, 9),
               lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1)),
    "conv2d": (lambda **kw: BitConv2d(2, 4, 3, padding=1, groups=2, **kw), (2, 2, 5, 5),
               lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=2)),
}


def fake_quant(x, act="per_tensor", eps_beta=1e-6):
    """docs/algorithms.md#bit-layers by hand: beta * clamp(round(x / beta), -127, 127)."""
    if act == "none":
        return x
    amax = x.abs().amax(dim=-1, keepdim=True) if act == "per_token" else x.abs().max()
    beta = amax / 127 + eps_beta
    return torch.clamp(torch.round(x / beta), -127, 127) * beta


def spec_forward(x, w, b, scale, alpha, op, act="per_tensor"):
    """docs/algorithms.md#bit-layers forward written out by hand (values only)."""
    gamma = max(scale, 1e-6)
    t = torch.sign(w) * (w.abs() > alpha * gamma)
    return gamma * op(fake_quant(x, act), t, None) + b.view(-1, *[1] * (x.dim() - 2))


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("act", ["per_tensor", "per_token", "none"])
def test_training_forward_equals_the_spec_formula(name, act):
    torch.manual_seed(0)
    make, shape, op = GEOMETRIES[name]
    layer = make(act_quant=act, rho_s=0.9)
    layer.alpha_override = 0.6
    with torch.no_grad():
        layer.weight_master.mul_(1.5)  # scale_ema (from the init) now differs from mean|W|
    s0 = layer.scale_ema.item()
    x = torch.randn(shape) * torch.linspace(0.1, 3.0, shape[-1])
    y = layer(x)
    w = layer.weight_master.detach()
    scale = 0.9 * s0 + 0.1 * w.abs().mean().item()
    assert layer.scale_ema.item() == pytest.approx(scale)
    expected = spec_forward(x, w, layer.bias.detach(), scale, 0.6, op, act)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_per_token_and_per_tensor_quantization_differ():
    torch.manual_seed(1)
    x = torch.randn(2, 16) * torch.tensor([[0.01], [100.0]])  # rows of very different scale
    layers = {act: BitLinear(16, 3, act_quant=act) for act in ("per_tensor", "per_token", "none")}
    state = layers["none"].state_dict()
    outputs = {}
    for act, layer in layers.items():
        layer.load_state_dict(state)
        outputs[act] = layer.eval()(x)
    bias = layers["none"].bias.detach()
    # the small row is rounded away per tensor but kept by per-token quantization
    assert torch.equal(outputs["per_tensor"][0], bias)
    small, exact = outputs["per_token"][0] - bias, outputs["none"][0] - bias
    assert (small - exact).norm() < 0.02 * exact.norm()
    # the large row sets the per-tensor scale, so both modes agree on it exactly
    assert torch.equal(outputs["per_token"][1], outputs["per_tensor"][1])


@pytest.mark.parametrize("name", GEOMETRIES)
def test_strict_bitnet_equals_chimera_at_alpha_half(name):
    torch.manual_seed(2)
    make, shape, _ = GEOMETRIES[name]
    strict, chimera = make(quant_mode="strict_bitnet"), make(quant_mode="chimera")
    chimera.load_state_dict(strict.state_dict())
    chimera.alpha_override = 0.5
    x = torch.randn(shape)
    y_strict, y_chimera = strict(x), chimera(x)
    assert torch.equal(y_strict, y_chimera)
    y_strict.square().sum().backward()
    y_chimera.square().sum().backward()
    assert torch.equal(strict.weight_master.grad, chimera.weight_master.grad)
    assert strict.get_last_stats() == chimera.get_last_stats() | {"alpha": 0.0}  # alpha_min


@pytest.mark.parametrize("name", GEOMETRIES)
def test_gradients_reach_input_weight_and_bias_through_both_stes(name):
    torch.manual_seed(3)
    make, shape, op = GEOMETRIES[name]
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    for tensor in (x, layer.weight_master, layer.bias):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    # weight STE: dL/dW = gamma * dL/dW_eff evaluated at (x_ste, T)
    gamma = layer.get_last_stats()["gamma"]
    x_ste = fake_quant(x.detach())
    w_eff = layer.weight_master.detach().sign().requires_grad_(True)  # alpha_min = 0: T = sign(W)
    op(x_ste, w_eff, None).backward(grad_y)
    torch.testing.assert_close(layer.weight_master.grad, gamma * w_eff.grad)


def training_alphas(layer, steps):
    alphas = []
    for _ in range(steps):
        layer(torch.randn(2, layer.in_features))
        alphas.append(layer.get_last_stats()["alpha"])
    return alphas


@pytest.mark.parametrize(("warmup_steps", "expected"), [
    (4, [0.0, 0.7 / 3, 1.4 / 3, 0.7, 0.7]),  # alpha_target at training forward number 4
    (2, [0.0, 0.7, 0.7]),
    (1, [0.7, 0.7]),  # one warm-up forward: alpha_target from the first one
    (0, [0.7, 0.7]),
])
def test_warmup_reaches_alpha_target_at_forward_number_warmup_steps(warmup_steps, expected):
    layer = BitLinear(4, 4, alpha_target=0.7, warmup_steps=warmup_steps)
    assert training_alphas(layer, len(expected)) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_warmup_alpha_on_the_device_equals_the_python_float_formula(name):
    """Each warm-up forward equals, bit for bit, a twin driven by ``alpha_override`` set to the
    schedule written in Python floats (the eager path before alpha moved to the device)."""
    torch.manual_seed(7)
    make, shape, _ = GEOMETRIES[name]
    layer = make(alpha_min=0.05, alpha_target=1.1, warmup_steps=7)
    twin = make()
    twin.load_state_dict(layer.state_dict())
    for step in range(9):
        expected_alpha = 0.05 + (1.1 - 0.05) * min(step / 6, 1.0)
        twin.alpha_override = expected_alpha
        x = torch.randn(shape)
        assert torch.equal(layer(x), twin(x)), step
        assert layer.get_last_stats()["alpha"] == expected_alpha
        assert torch.equal(layer.scale_ema, twin.scale_ema)


def test_warmup_schedule_override_and_run_time_target():
    layer = BitLinear(4, 4, alpha_min=0.2, alpha_target=1.0, warmup_steps=4)
    x = torch.randn(2, 4)
    alphas = []
    for i in range(6):
        layer(x)
        alphas.append(layer.get_last_stats()["alpha"])
        if i == 1:  # eval forwards use but do not advance the schedule
            layer.eval()(x)
            assert layer.get_last_stats()["alpha"] == pytest.approx(0.2 + 0.8 * 2 / 3)
            layer.train()
    assert alphas == pytest.approx([0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0, 1.0, 1.0])
    assert int(layer.forward_step) == 6
    layer.alpha_target = 0.3
    assert layer.current_alpha() == 0.3
    layer.alpha_override = 0.05
    assert layer.current_alpha() == 0.05
    layer.alpha_override = None
    assert layer.current_alpha() == 0.3
    with pytest.raises(ValueError, match="alpha_target"):
        layer.alpha_target = -0.1
    with pytest.raises(ValueError, match="alpha_override"):
        layer.alpha_override = -1.0


def test_no_warmup_and_override_during_warmup():
    assert BitLinear(2, 2, warmup_steps=0, alpha_target=0.9).current_alpha() == 0.9
    layer = BitLinear(2, 2, alpha_min=0.0, alpha_target=0.9, warmup_steps=10)
    layer.alpha_override = 0.4
    layer(torch.randn(1, 2))
    assert layer.get_last_stats()["alpha"] == 0.4


@pytest.mark.parametrize("stat_mode", ["mean", "median"])
def test_scale_ema_initialisation_and_update(stat_mode):
    torch.manual_seed(4)
    layer = BitLinear(5, 3, stat_mode=stat_mode, rho_s=0.75)
    stat = getattr(torch, stat_mode)
    assert layer.scale_ema.item() == pytest.approx(stat(layer.weight_master.detach().abs()).item())
    with torch.no_grad():
        layer.weight_master.mul_(3.0)
    s0 = layer.scale_ema.item()
    layer(torch.randn(2, 5))
    expected = 0.75 * s0 + 0.25 * stat(layer.weight_master.detach().abs()).item()
    assert layer.scale_ema.item() == pytest.approx(expected)
    assert layer.get_last_stats()["gamma"] == pytest.approx(expected)


def test_eval_changes_neither_scale_ema_nor_forward_step():
    layer = BitConv2d(3, 4, 3)
    layer(torch.randn(1, 3, 6, 6))
    with torch.no_grad():
        layer.weight_master.mul_(2.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    for _ in range(3):
        layer(torch.randn(1, 3, 6, 6))
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_get_last_stats():
    layer = BitLinear(4, 2, bias=False)
    assert layer.get_last_stats() is None
    with torch.no_grad():
        layer.weight_master.copy_(torch.tensor([[0.1, -0.5, 0.9, 0.0], [-2.0, 0.3, 0.6, -0.05]]))
    layer.reset_scale()  # mean|W| = 0.55625
    layer.alpha_override = 1.0
    layer.eval()(torch.randn(3, 4))
    stats = layer.get_last_stats()
    t = torch.tensor([0.0, 0, 1, 0, -1, 0, 1, 0])
    assert stats == {"gamma": pytest.approx(0.55625), "alpha": 1.0, **ternary_stats(t),
                     "num_weights": 8}


def test_zero_weights_use_eps_gamma_and_stay_finite():
    layer = BitLinear(3, 2, eps_gamma=1e-3)
    with torch.no_grad():
        layer.weight_master.zero_()
    layer.reset_scale()
    y = layer.eval()(torch.zeros(2, 3))
    assert torch.isfinite(y).all() and layer.get_last_stats()["gamma"] == pytest.approx(1e-3)


def test_ste_clip_of_one_is_the_identity():
    torch.manual_seed(5)
    clipped, plain = BitLinear(4, 3, ste_clip=1.0), BitLinear(4, 3, ste_clip=None)
    plain.load_state_dict(clipped.state_dict())
    x = torch.randn(2, 4)
    y1, y2 = clipped(x), plain(x)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(clipped.weight_master.grad, plain.weight_master.grad)


def test_parameters_buffers_and_init():
    layer = BitConv2d(4, 8, (3, 1), stride=(2, 1), bias=True)
    assert [n for n, _ in layer.named_parameters()] == ["weight_master", "bias"]
    assert layer.weight_master.shape == (8, 4, 3, 1) and layer.weight_master.dtype == torch.float32
    assert layer.scale_ema.dim() == 0 and layer.forward_step.dtype == torch.int64
    bound = 1 / math.sqrt(12)  # kaiming-uniform a=sqrt(5) == U(±1/sqrt(fan_in))
    assert layer.weight_master.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer(torch.randn(1, 4, 9, 5)).shape == (1, 8, 4, 5)
    assert BitLinear(3, 2, bias=False).bias is None


def test_state_dict_restores_alpha_target_and_override_exactly():
    layer = BitLinear(4, 3)
    layer.alpha_target = 0.1 + 0.2  # not representable in float32
    layer.alpha_override = 1.0 / 3.0
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = BitLinear(4, 3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.alpha_target == 0.1 + 0.2 and fresh.alpha_override == 1.0 / 3.0
    layer.alpha_override = None
    fresh.load_state_dict(layer.state_dict())
    assert fresh.alpha_override is None and fresh.current_alpha() == layer.current_alpha()
    with pytest.raises(ValueError, match="extra state"):
        fresh.load_state_dict({**layer.state_dict(), "_extra_state": torch.zeros(2)})


@pytest.mark.parametrize("name", GEOMETRIES)
def test_eval_forward_is_exactly_gamma_times_ternary_weight(name):
    """The weight STE's forward value is T exactly, so an exported ternary model can match."""
    torch.manual_seed(6)
    make, shape, op = GEOMETRIES[name]
    layer = make(warmup_steps=0, ste_clip=None, rho_s=1.0)  # rho_s = 1: gamma stays fixed
    with torch.no_grad():  # latent weights spanning many binades
        layer.weight_master.mul_(torch.logspace(-4, 4, layer.weight_master.numel())
                                 .view_as(layer.weight_master))
    layer.reset_scale()
    x = torch.randn(shape)
    gamma = layer.scale_ema.clamp(min=layer.eps_gamma)
    t = quantize_weight_chimera(layer.weight_master.detach(), gamma, layer.alpha_target)
    expected = op(quantize_activations(x), gamma * t, layer.bias.detach())
    assert torch.equal(layer.eval()(x), expected)
    assert torch.equal(layer.train()(x), expected)  # the training forward has the same value


@pytest.mark.parametrize(("float_layer", "bit_type", "shape"), [
    (nn.Linear(5, 3), BitLinear, (2, 5)),
    (nn.Linear(5, 3, bias=False), BitLinear, (2, 5)),
    (nn.Conv1d(2, 4, 5, stride=2, padding=1), BitConv1d, (2, 2, 11)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), BitConv2d, (1, 4, 9, 9)),
    (nn.Conv2d(2, 3, 3, padding="same"), BitConv2d, (1, 2, 5, 5)),
])
def test_from_float_keeps_geometry_and_latent_weights(float_layer, bit_type, shape):
    layer = bit_type.from_float(float_layer.eval(), alpha_target=0.3)
    assert type(layer) is bit_type and not layer.training and layer.alpha_target == 0.3
    assert torch.equal(layer.weight_master, float_layer.weight)
    assert (layer.bias is None) == (float_layer.bias is None)
    if layer.bias is not None:
        assert torch.equal(layer.bias, float_layer.bias)
    assert layer.scale_ema.item() == pytest.approx(float_layer.weight.abs().mean().item())
    x = torch.randn(shape)
    assert layer(x).shape == float_layer(x).shape


def test_from_float_rejects_other_modules():
    with pytest.raises(TypeError, match="Conv2d"):
        BitConv2d.from_float(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        BitConv2d.from_float(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"stat_mode": "max"}, "stat_mode"),
    ({"rho_s": 1.5}, "rho_s"),
    ({"rho_s": -0.1}, "rho_s"),
    ({"alpha_min": -0.1}, "alpha_min"),
    ({"alpha_target": -0.1}, "alpha_target"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2.5}, "warmup_steps"),
    ({"quant_mode": "binary"}, "quant_mode"),
    ({"eps_gamma": 0.0}, "eps_gamma"),
    ({"eps_beta": -1e-6}, "eps_beta"),
    ({"ste_clip": 0.0}, "ste_clip"),
    ({"act_quant": "per_channel"}, "act_quant"),
    ({"rho_s": math.nan}, "rho_s must be a number in"),
    ({"alpha_min": math.inf}, "alpha_min must be a finite number >= 0, got inf"),
    ({"alpha_target": math.inf}, "alpha_target must be a finite number >= 0, got inf"),
    ({"eps_gamma": math.inf}, "eps_gamma must be a finite number > 0, got inf"),
    ({"eps_beta": math.nan}, "eps_beta must be a number > 0, got nan"),
    ({"ste_clip": math.inf}, "ste_clip must be None or a finite number > 0, got inf"),
])
def test_invalid_quant_arguments(kwargs, match):
    for make, _, _ in GEOMETRIES.values():
        with pytest.raises(ValueError, match=match):
            make(**kwargs)


@pytest.mark.parametrize(("build", "match"), [
    (lambda: BitLinear(0, 3), "in_features"),
    (lambda: BitLinear(3, True), "out_features"),
    (lambda: BitConv2d(3, 4, 3, groups=2), "groups"),
    (lambda: BitConv2d(2, 4, (3, 3, 3)), "kernel_size"),
    (lambda: BitConv1d(2, 4, 3, stride=0), "stride"),
    (lambda: BitConv1d(2, 4, 3, padding=-1), "padding"),
    (lambda: BitConv2d(2, 4, 3, padding="full"), "padding"),
    (lambda: BitConv2d(2, 4, 3, stride=2, padding="same"), "same"),
])
def test_invalid_geometry(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_nonfinite_run_time_alpha_is_rejected_and_keeps_the_old_value():
    layer = BitLinear(4, 2)
    layer.alpha_override = 0.5
    for attribute in ("alpha_target", "alpha_override"):
        for value in (math.inf, math.nan):
            with pytest.raises(ValueError, match=f"^{attribute} must be"):
                setattr(layer, attribute, value)
    assert layer.alpha_target == 0.7 and layer.alpha_override == 0.5


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("act", ["per_tensor", "per_token", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_behaves_like_the_float_layer_and_changes_no_state(name, act, training,
                                                                         monkeypatch):
    import chimera.nn.bit_layers as bit_layers

    make, shape, op = GEOMETRIES[name]
    layer = make(act_quant=act, warmup_steps=4, compiled=True).train(training)
    monkeypatch.setattr(bit_layers, "compiled_operands", lambda *a: pytest.fail("compiled"))
    layer.compiled = False
    layer(torch.randn(shape))  # a first, non-empty forward
    layer.compiled = True  # an empty batch runs eagerly whatever the setting
    ema, step, stats = layer.scale_ema.clone(), int(layer.forward_step), layer.get_last_stats()
    x = torch.randn(0, *shape[1:], requires_grad=True)
    y = layer(x)
    assert y.shape == op(x, torch.zeros_like(layer.weight_master), None).shape
    assert y.shape[0] == 0
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight_master.grad, torch.zeros_like(layer.weight_master))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))
    assert torch.equal(layer.scale_ema, ema) and int(layer.forward_step) == step
    assert layer.get_last_stats() == stats


def test_empty_inner_dimension_and_empty_batch_before_any_forward():
    layer = BitLinear(6, 4, bias=False)
    assert layer(torch.randn(2, 0, 6)).shape == nn.Linear(6, 4)(torch.randn(2, 0, 6)).shape
    assert layer.get_last_stats() is None and int(layer.forward_step) == 0
    layer(torch.randn(0, 6)).sum().backward()  # no bias: the graph still reaches the weight
    assert torch.equal(layer.weight_master.grad, torch.zeros(4, 6))


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("act", ["per_tensor", "per_token"])
def test_act_ste_false_reproduces_the_original_input_gradient(name, act):
    """Without the activation STE (the original layers) the values and the weight and bias
    gradients are unchanged, and x gets the zero gradient of ``round``."""
    torch.manual_seed(8)
    make, shape, _ = GEOMETRIES[name]
    ste, plain = make(act_quant=act), make(act_quant=act, act_ste=False)
    plain.load_state_dict(ste.state_dict())
    x1 = torch.randn(shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ste(x1), plain(x2)
    assert torch.equal(y1, y2)
    grad_y = torch.randn_like(y1)
    y1.backward(grad_y)
    y2.backward(grad_y)
    assert x1.grad.abs().sum() > 0 and torch.equal(x2.grad, torch.zeros_like(x2))
    assert torch.equal(ste.weight_master.grad, plain.weight_master.grad)
    assert torch.equal(ste.bias.grad, plain.bias.grad)
    assert "act_ste=False" in repr(plain)


def test_act_ste_false_blocks_gradient_to_earlier_layers_and_config_passes_it():
    from chimera.nn.quantize import TernaryConfig, quantize_

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2))
    quantize_(model, TernaryConfig(skip=(), act_ste=False))
    assert [m.act_ste for m in model] == [False] * 3
    model(torch.randn(4, 6)).square().sum().backward()
    assert model[2].weight_master.grad.abs().sum() > 0
    assert torch.equal(model[0].weight_master.grad, torch.zeros(6, 6))  # as in the original
    assert TernaryConfig().act_ste is True
    with pytest.raises(ValueError, match="^act_ste must be True or False, got 1$"):
        TernaryConfig(act_ste=1)
