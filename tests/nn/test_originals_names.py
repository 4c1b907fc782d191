"""The original project's names for the Bit layers' pieces: ``ChimeraConv2d``,
``quantize_weight()`` and ``ema_update`` (docs/algorithms.md#bit-layers)."""

import pytest
import torch

from chimera.nn import bit_layers
from chimera.nn.bit_layers import BitConv2d, BitLinear, ChimeraConv2d
from chimera.quant import functions
from chimera.quant.functions import abs_stat, ema_update, quantize_weight_chimera


def test_chimera_conv2d_is_bit_conv2d():
    assert ChimeraConv2d is BitConv2d
    assert type(ChimeraConv2d(2, 4, 3)) is BitConv2d


@pytest.mark.parametrize("make", [lambda: BitLinear(8, 4, warmup_steps=5),
                                  lambda: BitConv2d(2, 4, 3, warmup_steps=5)])
def test_quantize_weight_is_the_forwards_ternary_weight_and_changes_no_state(make):
    torch.manual_seed(0)
    layer = make()
    for _ in range(2):  # into the warm-up: alpha is neither alpha_min nor alpha_target
        layer(torch.randn(2, 8) if isinstance(layer, BitLinear) else torch.randn(1, 2, 6, 6))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    t = layer.quantize_weight()
    assert not t.requires_grad and t.shape == layer.weight_master.shape
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    gamma = layer.scale_ema.clamp(min=layer.eps_gamma)
    expected = quantize_weight_chimera(layer.weight_master.detach(), gamma, layer.current_alpha())
    assert torch.equal(t, expected)
    # the next eval forward uses exactly this T (the weight STE's value is T)
    layer.eval()
    x = torch.randn(2, 8) if isinstance(layer, BitLinear) else torch.randn(1, 2, 6, 6)
    layer(x)
    counts = [(t == v).sum().item() / t.numel() for v in (0, 1, -1)]
    stats = layer.get_last_stats()
    assert [stats["zero_ratio"], stats["plus_ratio"], stats["minus_ratio"]] == counts
    # explicit gamma and alpha
    assert torch.equal(layer.quantize_weight(gamma=1e9), torch.zeros_like(t))
    assert torch.equal(layer.quantize_weight(alpha=0.0), torch.sign(layer.weight_master.detach()))


def test_ema_update_is_the_function_the_layer_uses():
    assert bit_layers.ema_update is functions.ema_update
    torch.manual_seed(1)
    layer = BitLinear(5, 3, rho_s=0.8)
    with torch.no_grad():
        layer.weight_master.mul_(2.0)
    old = layer.scale_ema.clone()
    layer(torch.randn(2, 5))
    expected = ema_update(old, abs_stat(layer.weight_master.detach()), 0.8)
    assert torch.equal(layer.scale_ema, expected)
