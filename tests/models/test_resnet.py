import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chimera.models.resnet import ChimeraResNet20, resnet20
from chimera.nn.bit_layers import BitConv2d, BitLayer, BitLinear
from chimera.nn.quantize import IntTernaryConfig
from chimera.quant.stats import model_quant_stats

NUM_WEIGHT_LAYERS = 22  # 19 3x3 convs + 2 shortcut 1x1 convs + the classifier


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_count_and_shapes():
    model = resnet20()
    assert num_params(model) == 272_474
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 8, 8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == NUM_WEIGHT_LAYERS - 1 and all(c.bias is None for c in convs)
    assert resnet20(num_classes=100).fc.out_features == 100


def test_fp32_baseline_has_no_ternary_layers():
    model = ChimeraResNet20(mode="fp32_baseline")
    assert num_params(model) == 272_474
    assert not any(isinstance(m, BitLayer) for m in model.modules())


@pytest.mark.parametrize("mode", ["strict_bitnet", "chimera"])
@pytest.mark.parametrize("first_last_fp32", [True, False])
def test_every_parameter_of_ternary_resnet20_gets_gradient(mode, first_last_fp32):
    torch.manual_seed(0)
    model = ChimeraResNet20(mode=mode, first_last_fp32=first_last_fp32,
                            quant_config={"alpha_target": 0.6})
    assert num_params(model) == 272_474
    bit_layers = [m for m in model.modules() if isinstance(m, BitLayer)]
    assert len(bit_layers) == NUM_WEIGHT_LAYERS - 2 * first_last_fp32
    assert all(m.quant_mode == mode and m.alpha_target == 0.6 for m in bit_layers)
    assert isinstance(model.conv1, BitConv2d) != first_last_fp32
    assert isinstance(model.fc, BitLinear) != first_last_fp32
    loss = F.cross_entropy(model(torch.randn(3, 3, 32, 32)), torch.tensor([0, 1, 2]))
    loss.backward()
    params = list(model.named_parameters())
    assert len(params) == 65
    dead = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    stats = model_quant_stats(model)
    assert stats["num_ternary_layers"] == len(bit_layers)
    assert stats["num_ternary_weights"] == sum(m.weight_master.numel() for m in bit_layers)


def test_int_ternary_is_looked_up_when_built(monkeypatch):
    calls = []

    def fake_convert(config, module):
        calls.append(config.layer_kwargs())
        return module

    monkeypatch.setattr(IntTernaryConfig, "convert", fake_convert)
    ChimeraResNet20(mode="int_ternary", quant_config={"group_size": 32})
    assert calls == [{"group_size": 32, "act_quant": "per_tensor"}] * NUM_WEIGHT_LAYERS


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "binary"}, "mode"),
    ({"quant_config": [("alpha_target", 0.5)]}, "quant_config"),
    ({"num_classes": 0}, "num_classes"),
    ({"quant_config": {"rho_s": 2.0}}, "rho_s"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChimeraResNet20(**kwargs)


def test_chimera_resnet20_trains_on_random_cifar_shaped_data():
    torch.manual_seed(0)
    model = ChimeraResNet20(mode="chimera")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def _original_keys() -> set[str]:
    """The state-dict keys of the original project's float ChimeraResNet20 (written out from its
    module layout: conv1, bn1, layer1-3 of blocks conv1/bn1/conv2/bn2/shortcut, avgpool, fc)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", *(f"bn1.{k}" for k in bn), "fc.weight", "fc.bias"}
    for stage in (1, 2, 3):
        for block in range(3):
            p = f"layer{stage}.{block}"
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            keys |= {f"{p}.bn{i}.{k}" for i in (1, 2) for k in bn}
            if stage > 1 and block == 0:
                keys |= {f"{p}.shortcut.0.weight", *(f"{p}.shortcut.1.{k}" for k in bn)}
    return keys


def test_module_names_follow_the_original_so_its_checkpoints_load():
    model = resnet20()
    assert set(model.state_dict()) == _original_keys()
    assert [n for n, _ in model.named_children()] == [
        "conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"]
    torch.manual_seed(1)
    other = resnet20()
    model.load_state_dict(other.state_dict())  # strict: every key matches
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), other.eval()(x))
    assert model.layer2[0].shortcut[0].stride == (2, 2)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
