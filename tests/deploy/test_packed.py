"""Packed inference layers (docs/algorithms.md#packing-and-export): arguments and edge inputs."""

import math

import pytest
import torch
from torch import nn

from chimera.deploy.packed import (
    PackedTernaryConv1d,
    PackedTernaryConv2d,
    PackedTernaryLinear,
    PackedTernaryModule,
)
from chimera.nn.bit_layers import BitConv2d, BitLinear
from chimera.nn.int_ternary import IntTernaryLinear


@pytest.mark.parametrize(("layer", "float_layer", "shape"), [
    (lambda: PackedTernaryLinear(6, 4), nn.Linear(6, 4), (0, 6)),
    (lambda: PackedTernaryLinear(6, 4, bias=False, group_size=4, act_quant="per_token"),
     nn.Linear(6, 4, bias=False), (2, 0, 6)),
    (lambda: PackedTernaryConv1d(2, 4, 3, padding=1), nn.Conv1d(2, 4, 3, padding=1), (0, 2, 7)),
    (lambda: PackedTernaryConv2d(2, 4, 3, groups=2, clip=1.0), nn.Conv2d(2, 4, 3, groups=2),
     (0, 2, 5, 5)),
])
def test_empty_batch_gives_the_float_layers_empty_output(layer, float_layer, shape):
    x = torch.randn(shape)
    assert layer()(x).shape == float_layer(x).shape


@pytest.mark.parametrize("source", [lambda: BitLinear(6, 4), lambda: IntTernaryLinear(6, 4),
                                    lambda: BitConv2d(2, 4, 3)])
def test_packed_twin_of_a_layer_matches_it_on_an_empty_batch(source):
    layer = source().eval()
    x = torch.randn(0, 2, 5, 5) if isinstance(layer, BitConv2d) else torch.randn(0, 6)
    packed = PackedTernaryModule.from_module(layer)
    assert packed(x).shape == layer(x).shape and packed(x).shape[0] == 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eps_beta": math.inf}, "eps_beta must be a finite number > 0, got inf"),
    ({"eps_beta": math.nan}, "eps_beta must be a number > 0, got nan"),
    ({"clip": math.inf}, "clip must be None or a finite number > 0, got inf"),
    ({"clip": 0.0}, "clip must be None or a number > 0, got 0.0"),
    ({"group_size": math.inf}, "group_size must be None or an integer >= 1, got inf"),
])
def test_nonfinite_and_out_of_range_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=f"^{match}$"):
        PackedTernaryLinear(6, 4, **kwargs)
