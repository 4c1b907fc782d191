import pytest
import torch
from torch import nn

from chimera.data import load_task
from chimera.models import MODELS, build_model
from chimera.models.cnn import MIN_LENGTH, output_length

TASK_SHAPES = {"digits": (64,), "mnist1d": (40,)}


def test_task_shapes_are_the_loaded_ones():
    assert load_task("digits").input_shape == TASK_SHAPES["digits"]
    assert load_task("mnist1d").input_shape == TASK_SHAPES["mnist1d"]


def test_registry():
    assert {"mlp", "cnn", "resnet20"} <= set(MODELS.names())
    with pytest.raises(ValueError, match="unknown model 'resnet'; known: mlp, cnn"):
        build_model("resnet", (40,), 10)


def test_resnet20_needs_images():
    assert build_model("resnet20", (1, 8, 8), 10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError,
                       match=r"input_shape must be \(channels, height, width\) for resnet20"):
        build_model("resnet20", (40,), 10)


@pytest.mark.parametrize("shape", TASK_SHAPES.values())
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_forward_shapes_on_task_inputs(name, shape):
    model = build_model(name, shape, 10)
    x = torch.randn(7, *shape)
    out = model(x)
    assert out.shape == (7, 10) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_only_linear_conv_and_activation_weights():
    for name in ("mlp", "cnn"):
        for module in build_model(name, (40,), 10).modules():
            if any(True for _ in module.parameters(recurse=False)):
                assert isinstance(module, nn.Linear | nn.Conv1d)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_mlp_depth_and_width(depth):
    model = build_model("mlp", (8, 8), 4, hidden=16, depth=depth)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == depth + 1
    assert linears[0].in_features == 64 and linears[-1].out_features == 4
    assert all(m.out_features == 16 for m in linears[:-1])
    assert model(torch.randn(2, 8, 8)).shape == (2, 4)


def test_mlp_default_is_two_hidden_layers_of_100():
    widths = [m.out_features for m in build_model("mlp", (40,), 10) if isinstance(m, nn.Linear)]
    assert widths == [100, 100, 10]


def test_cnn_matches_convbase_on_mnist1d():
    model = build_model("cnn", (40,), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    spec = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs]
    assert spec == [
        (1, 25, (5,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
    ]
    assert model.head.in_features == 125  # 25 channels x length 5


def test_cnn_accepts_channel_dim_and_multichannel_input():
    model = build_model("cnn", (40,), 10, channels=8)
    x = torch.randn(3, 40)
    assert torch.equal(model(x), model(x.unsqueeze(1)))
    assert build_model("cnn", (2, 17), 3)(torch.randn(4, 2, 17)).shape == (4, 3)


@pytest.mark.parametrize("length", [MIN_LENGTH, 4, 9, 40, 101])
def test_cnn_output_length_formula(length):
    model = build_model("cnn", (length,), 5, channels=3)
    assert model.features(torch.randn(2, 1, length)).shape == (2, 3 * output_length(length))


def test_cnn_minimum_length():
    assert MIN_LENGTH == 3 and output_length(2) < 1
    with pytest.raises(ValueError, match="length 2 .* minimum is 3"):
        build_model("cnn", (2,), 10)


@pytest.mark.parametrize(
    ("name", "shape", "classes", "kwargs", "match"),
    [
        ("mlp", (40,), 10, {"hidden": 0}, "hidden"),
        ("mlp", (40,), 10, {"depth": -1}, "depth"),
        ("cnn", (40,), 10, {"channels": 0}, "channels"),
        ("cnn", (2, 3, 40), 10, {}, "input_shape"),
        ("mlp", (40,), 1, {}, "num_classes"),
        ("cnn", (40,), 0, {}, "num_classes"),
        ("mlp", (), 10, {}, "input_shape"),
        ("cnn", (), 10, {}, "input_shape"),
        ("mlp", (40,), 10, {"hidden": True}, "hidden must be an integer >= 1, got True"),
        ("cnn", (40,), 10, {"channels": 2.0}, "channels must be an integer >= 1, got 2.0"),
        ("mlp", (40,), 10.0, {}, "num_classes must be an integer >= 2, got 10.0"),
    ],
)
def test_rejects_impossible_sizes(name, shape, classes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, shape, classes, **kwargs)
