"""A ternarized model (Bit layers, eval) and an integer-ternary model export through
``torch.export.export`` and ``torch.onnx.export`` (``dynamo=True``; the integer-ternary one with
the TorchScript exporter, ``dynamo=False``, too) and run in ONNX Runtime with the outputs of
torch, at a batch size other than the one exported with."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from torch import nn

from chimera import ternarize
from chimera.nn import BitConv1d, BitLinear, IntTernaryLinear

BATCH = torch.export.Dim("batch", min=1, max=64)


def _bit_model() -> nn.Module:
    """Conv1d + MLP, every layer a Bit layer, its scale EMA and warm-up moved by training."""
    model = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4))
    ternarize(model, "chimera", skip=[], warmup_steps=10)
    assert isinstance(model[0], BitConv1d) and isinstance(model[5], BitLinear)
    model(torch.randn(8, 2, 16))  # one training forward: forward_step 1, alpha mid warm-up
    return model.eval()


def _int_ternary_model() -> nn.Module:
    model = ternarize(nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 4)),
                      "int_ternary", skip=[], group_size=16)
    assert isinstance(model[0], IntTernaryLinear)
    return model.eval()


def _onnx_outputs(model: nn.Module, example: torch.Tensor, x: torch.Tensor, path,
                  dynamo: bool) -> torch.Tensor:
    shapes = dict(dynamic_shapes=({0: BATCH},)) if dynamo else dict(
        input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    torch.onnx.export(model, (example,), str(path), dynamo=dynamo, **shapes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_bit_layers_export_and_run_in_onnx_runtime(tmp_path):
    model = _bit_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example, x = torch.randn(4, 2, 16), torch.randn(7, 2, 16)
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: BATCH},))
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)
    got = _onnx_outputs(model, example, x, tmp_path / "bit.onnx", dynamo=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for key, value in model.state_dict().items():  # exporting an eval model changes nothing
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_int_ternary_layers_export_and_run_in_onnx_runtime(tmp_path, dynamo):
    model = _int_ternary_model()
    example, x = torch.randn(4, 8), torch.randn(7, 8)
    with torch.no_grad():
        expected = model(x)
    if dynamo:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: BATCH},))
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)
    got = _onnx_outputs(model, example, x, tmp_path / "int.onnx", dynamo=dynamo)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
