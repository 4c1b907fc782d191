import pytest
import torch
from torch import nn

from chimera.models.resmlp import ResMLP
from chimera.nn.bit_layers import BitLinear
from chimera.nn.quantize import ternarize


def test_structure_and_sizes():
    model = ResMLP((40,), 10, d_hidden=32, num_blocks=3, mlp_ratio=2)
    assert model.stem[1].in_features == 40 and model.stem[1].out_features == 32
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 3
    for block in model.blocks:
        ln, w1, act, w2 = block
        assert isinstance(ln, nn.LayerNorm) and isinstance(act, nn.GELU)
        assert (w1.in_features, w1.out_features, w2.out_features) == (32, 64, 32)
    assert isinstance(model.head[0], nn.LayerNorm) and model.head[1].out_features == 10


def test_forward_is_the_residual_composition():
    torch.manual_seed(0)
    model = ResMLP((8, 5), 4, d_hidden=16, num_blocks=2)
    x = torch.randn(3, 8, 5)
    h = model.stem(x)
    for block in model.blocks:
        h = h + block(h)
    torch.testing.assert_close(model(x), model.head(h))
    assert model(x).shape == (3, 4)


def test_defaults_follow_spec():
    model = ResMLP((40,), 10)
    assert model.d_hidden == 512 and len(model.blocks) == 12


def test_zero_blocks_is_stem_then_head():
    model = ResMLP((6,), 3, d_hidden=8, num_blocks=0)
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), model.head(model.stem(x)))


def test_only_linear_layernorm_and_gelu_hold_weights_and_ternarize_converts_blocks():
    model = ResMLP((40,), 10, d_hidden=16, num_blocks=2)
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, nn.Linear | nn.LayerNorm)
    ternarize(model, "chimera", skip=("first", "last"))
    assert type(model.stem[1]) is nn.Linear and type(model.head[1]) is nn.Linear
    assert all(isinstance(b[1], BitLinear) and isinstance(b[3], BitLinear) for b in model.blocks)
    assert model(torch.randn(2, 40)).shape == (2, 10)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"d_hidden": 0}, "d_hidden"), ({"num_blocks": -1}, "num_blocks"),
    ({"mlp_ratio": 0}, "mlp_ratio"), ({"num_blocks": 1.5}, "num_blocks"),
])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResMLP((40,), 10, **kwargs)


@pytest.mark.parametrize(("shape", "classes", "match"), [
    ((), 10, "input_shape"), ((0,), 10, "input_shape"), ((40,), 0, "num_classes"),
])
def test_bad_shapes(shape, classes, match):
    with pytest.raises(ValueError, match=match):
        ResMLP(shape, classes)
