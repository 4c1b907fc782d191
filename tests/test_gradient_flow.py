"""docs/algorithms.md#bit-layers's guard against the reference implementation's defect: in every
quantized model of
the toolkit, every trainable parameter receives a non-zero gradient after one backward (and every
integer-ternary layer receives its dL/dW)."""

import pytest
import torch
import torch.nn.functional as F

from chimera.data import load_task
from chimera.models import MODELS, build_model
from chimera.nn.int_ternary import IntTernaryModule
from chimera.nn.quantize import QUANTIZERS, ternarize
from chimera.run.spec import RunSpec
from chimera.run.trainer import train

TERNARY = [n for n in QUANTIZERS.names() if n != "fp32"]

INPUTS = {"mlp": (64,), "cnn": (40,), "resnet20": (3, 32, 32)}


def test_every_registered_model_is_covered():
    assert set(INPUTS) <= set(MODELS.names())


@pytest.mark.parametrize("mode", TERNARY)
@pytest.mark.parametrize("skip", [(), ("first", "last")])
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_every_parameter_gets_a_nonzero_gradient(name, mode, skip):
    torch.manual_seed(0)
    model = ternarize(build_model(name, INPUTS[name], 10), mode, skip=skip)
    x = torch.randn(4, *INPUTS[name])
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []
    for module in model.modules():
        if isinstance(module, IntTernaryModule):
            assert module.weight_grad is not None and module.weight_grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["fp32", *TERNARY])
def test_resnet20_trains_on_synthetic_images_in_every_mode(mode):
    data = load_task("synthetic_images", n_train=32, n_test=8, image_size=16)
    opt = "scaled_optum" if mode == "int_ternary" else "adamw"
    spec = RunSpec("synthetic_images", "resnet20", opt, epochs=1, batch_size=16,
                   quantizer=mode, optimizer_hparams={"lr": 1e-2})
    final = train(spec, data=data, progress=False)
    assert final["steps"] == 2 and final["test_loss"] is not None
