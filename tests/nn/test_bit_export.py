"""Bit layers trace into one graph: the alpha warm-up is computed on the device, so
``torch.compile(fullgraph=True)`` and ``torch.export`` see no host sync
(docs/algorithms.md#bit-layers)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from chimera.nn.bit_layers import BitConv2d, BitLayer, BitLinear
from chimera.nn.quantize import ternarize


def ternary_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 8), nn.ReLU(), nn.Linear(8, 3))
    return ternarize(model, "chimera", skip=(), warmup_steps=4, compiled=False)


def bit_layers(model: nn.Module) -> list[BitLayer]:
    return [m for m in model.modules() if isinstance(m, BitLayer)]


def test_compile_fullgraph_equals_eager_in_training_and_eval():
    """One graph per mode (fullgraph raises on any break); outputs, gradients, scale EMAs, step
    counters and the warm-up's alphas equal the eager model's over the whole warm-up."""
    eager = ternary_model()
    fast = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    for step in range(6):
        x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(step))
        y_eager, y_fast = eager(x), compiled(x)
        assert torch.equal(y_eager, y_fast), step
        y_eager.square().sum().backward()
        y_fast.square().sum().backward()
        for (name, a), b in zip(eager.named_parameters(), fast.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), (step, name)
        for (name, a), b in zip(eager.named_buffers(), fast.buffers(), strict=True):
            assert torch.equal(a, b), (step, name)
        assert ([m.get_last_stats() for m in bit_layers(eager)]
                == [m.get_last_stats() for m in bit_layers(fast)])
    assert [m.get_last_stats()["alpha"] for m in bit_layers(fast)] == [0.7] * 3
    eager.eval()
    fast.eval()
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(eager(x), compiled(x))
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 2  # one training graph, one eval graph: no recompile
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compile_fullgraph_with_the_fast_path_inside_and_an_override():
    """``compiled=True`` layers inside an outer compile trace the eager function; an override
    alpha traces too."""
    torch.manual_seed(1)
    eager = BitConv2d(2, 3, 3, warmup_steps=3, compiled=False)
    eager.alpha_override = 0.25
    fast = copy.deepcopy(eager)
    fast.compiled = True
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(eager(x), compiled(x))
    assert fast.get_last_stats() == eager.get_last_stats()
    assert fast.get_last_stats()["alpha"] == 0.25


@pytest.mark.parametrize("warmup_done", [False, True])
def test_export_of_a_ternarized_model_in_eval_equals_eager(warmup_done):
    model = ternary_model()
    if warmup_done:
        for _ in range(5):
            model(torch.randn(2, 2, 5, 5))
    model.eval()
    x = torch.randn(4, 2, 5, 5)
    stats = [m.get_last_stats() for m in bit_layers(model)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "tensor attributes were assigned during export"
        exported = torch.export.export(model, (x,))
    assert [m.get_last_stats() for m in bit_layers(model)] == stats  # tracing kept none
    assert torch.equal(exported.module()(x), model(x))
    other = torch.randn(4, 2, 5, 5)
    assert torch.equal(exported.module()(other), model(other))


def test_export_reads_the_step_counter_as_an_input():
    """The warm-up alpha of an exported layer follows the forward_step it is given."""
    torch.manual_seed(2)
    layer = BitLinear(16, 4, alpha_target=1.0, warmup_steps=3).eval()
    exported = torch.export.export(layer, (torch.randn(2, 16),)).module()
    x = torch.randn(2, 16)
    for step in range(4):
        layer.forward_step.fill_(step)
        exported.forward_step.fill_(step)
        assert torch.equal(exported(x), layer(x)), step
        assert layer.get_last_stats()["alpha"] == pytest.approx(min(step / 2, 1.0))


def test_alpha_is_a_device_tensor_and_reported_as_a_float():
    layer = BitLinear(4, 2, alpha_min=0.1, alpha_target=0.5, warmup_steps=5)
    alpha = layer.alpha_tensor()
    assert isinstance(alpha, torch.Tensor) and alpha.dim() == 0
    assert alpha.device == layer.forward_step.device and alpha.dtype == torch.float64
    layer.forward_step.fill_(2)
    assert layer.alpha_tensor().item() == 0.1 + (0.5 - 0.1) * (2 / 4) == layer.current_alpha()
    layer(torch.randn(1, 4))
    assert type(layer.get_last_stats()["alpha"]) is float
