import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from chimera.nn.bit_layers import BitLinear
from chimera.quant.stats import (
    entropy_from_ternary_ratios,
    model_quant_stats,
    sign_counts,
    symmetric_zero_ratio_for_entropy,
    ternary_counts,
    ternary_stats,
)

LOG2_3 = math.log2(3)


def test_ternary_stats_hand_values():
    stats = ternary_stats(torch.tensor([0.0, 0.0, 1.0, -1.0]))
    assert stats == {"zero_ratio": 0.5, "plus_ratio": 0.25, "minus_ratio": 0.25,
                     "effective_bits": 1.5}
    assert all(type(v) is float for v in stats.values())
    assert ternary_stats(torch.zeros(7, dtype=torch.int8))["effective_bits"] == 0.0
    assert ternary_stats(torch.tensor([-1, 0, 1]))["effective_bits"] == pytest.approx(LOG2_3)


@pytest.mark.parametrize(("arg", "err"), [
    (torch.tensor([0.0, 2.0]), ValueError),
    (torch.tensor([0.5]), ValueError),
    (torch.empty(0), ValueError),
    ([0, 1], TypeError),
])
def test_ternary_stats_rejects_bad_input(arg, err):
    with pytest.raises(err):
        ternary_stats(arg)


def test_entropy_from_ratios():
    assert entropy_from_ternary_ratios(1 / 3, 1 / 3, 1 / 3) == pytest.approx(LOG2_3)
    assert entropy_from_ternary_ratios(1.0, 0.0, 0.0) == 0.0
    assert entropy_from_ternary_ratios(0.5, 0.5, 0.0) == pytest.approx(1.0)
    assert entropy_from_ternary_ratios(0.5, 0.25, 0.25 + 5e-7) == pytest.approx(1.5, abs=1e-5)


@pytest.mark.parametrize(("ratios", "match"), [
    ((-0.1, 0.6, 0.5), r"^z must be a number >= 0, got -0.1$"),
    ((0.5, 0.5, 0.5), "ratios must sum to 1"), ((0.3, 0.3, 0.3), "ratios must sum to 1"),
    ((math.nan, 0.5, 0.5), "z must be a number >= 0, got nan"),
    ((0.0, True, 0.0), "p must be a number >= 0, got True"),
])
def test_entropy_from_ratios_rejects_bad_ratios(ratios, match):
    with pytest.raises(ValueError, match=match):
        entropy_from_ternary_ratios(*ratios)


def test_solver_pinned_values():
    assert symmetric_zero_ratio_for_entropy(1.32) == pytest.approx(0.63038, abs=5e-6)
    assert symmetric_zero_ratio_for_entropy(1.32, "dense") == pytest.approx(0.07914, abs=5e-6)
    assert symmetric_zero_ratio_for_entropy(1.5) == pytest.approx(0.5, abs=1e-12)
    # H is flat at its maximum, so z there is only determined to ~sqrt(machine epsilon)
    assert symmetric_zero_ratio_for_entropy(LOG2_3) == pytest.approx(1 / 3, abs=1e-7)
    assert symmetric_zero_ratio_for_entropy(LOG2_3, "dense") == pytest.approx(1 / 3, abs=1e-7)
    assert symmetric_zero_ratio_for_entropy(0.0) == pytest.approx(1.0)
    assert symmetric_zero_ratio_for_entropy(1.0, "dense") == pytest.approx(0.0, abs=1e-12)


@given(bits=st.floats(0.0, LOG2_3), branch=st.sampled_from(["sparse", "dense"]))
def test_solver_inverts_the_symmetric_entropy(bits, branch):
    if branch == "dense":
        bits = max(bits, 1.0)
    z = symmetric_zero_ratio_for_entropy(bits, branch)
    low, high = (1 / 3, 1.0) if branch == "sparse" else (0.0, 1 / 3)
    assert low - 1e-12 <= z <= high + 1e-12
    assert entropy_from_ternary_ratios(z, (1 - z) / 2, (1 - z) / 2) == pytest.approx(bits, abs=1e-9)


@pytest.mark.parametrize(("bits", "branch", "match"), [
    (1.6, "sparse", "bits"), (-0.01, "sparse", "bits"), (0.9, "dense", "bits"),
    (math.nan, "sparse", "bits"), (True, "sparse", "bits"), (1.0, "middle", "branch"),
])
def test_solver_rejects_bad_input(bits, branch, match):
    with pytest.raises(ValueError, match=match):
        symmetric_zero_ratio_for_entropy(bits, branch)


def _layer(weights, alpha_target):
    w = torch.tensor(weights)
    layer = BitLinear(w.shape[1], w.shape[0], alpha_target=alpha_target).eval()
    with torch.no_grad():
        layer.weight_master.copy_(w)
    layer.reset_scale()
    layer.alpha_override = 0.0  # T = sign(W): zeros exactly where W == 0
    layer(torch.randn(2, w.shape[1]))
    return layer


def test_model_quant_stats_weights_layers_by_size():
    a = _layer([[0.0, 0.0], [0.0, 1.0]], alpha_target=0.5)  # 4 weights: z .75, p .25
    b = _layer([[1.0, -1.0, 1.0]] * 2 + [[-1.0, 1.0, -1.0]] * 2, alpha_target=1.0)  # 12: p=m=.5
    model = nn.ModuleDict({"a": a, "b": b, "fp": nn.Linear(3, 3), "unused": BitLinear(5, 5)})
    stats = model_quant_stats(model)
    assert stats["num_ternary_layers"] == 2 and stats["num_ternary_weights"] == 16
    assert stats["global_zero_ratio"] == pytest.approx(3 / 16)
    assert stats["global_plus_ratio"] == pytest.approx(7 / 16)
    assert stats["global_minus_ratio"] == pytest.approx(6 / 16)
    assert stats["global_effective_bits"] == pytest.approx(
        entropy_from_ternary_ratios(3 / 16, 7 / 16, 6 / 16))
    assert stats["mean_zero_ratio"] == pytest.approx(0.375)
    assert stats["mean_plus_ratio"] == pytest.approx(0.375)
    assert stats["mean_minus_ratio"] == pytest.approx(0.25)
    h_a = entropy_from_ternary_ratios(0.75, 0.25, 0.0)
    assert stats["mean_effective_bits"] == pytest.approx((h_a + 1.0) / 2)
    assert stats["alpha_mean"] == 0.0 and stats["alpha_target_mean"] == pytest.approx(0.75)


def test_model_quant_stats_without_ternary_layers():
    stats = model_quant_stats(nn.Sequential(nn.Linear(2, 2), BitLinear(2, 2)))
    assert stats["num_ternary_layers"] == 0 and stats["num_ternary_weights"] == 0
    assert stats["global_effective_bits"] is None and stats["mean_zero_ratio"] is None


def test_model_quant_stats_requires_weight_count():
    class Incomplete(nn.Module):
        def get_last_stats(self):
            return {"zero_ratio": 1.0, "plus_ratio": 0.0, "minus_ratio": 0.0, "effective_bits": 0}

    with pytest.raises(ValueError, match="num_weights"):
        model_quant_stats(nn.Sequential(Incomplete()))


@pytest.mark.parametrize("gamma", [0.3, 1e-30, float("inf")])
def test_sign_counts_of_a_scaled_ternary_tensor_equal_the_ternary_counts(gamma):
    t = torch.tensor([1.0, -1.0, 0.0, 1.0, 0.0, 0.0, -1.0, 1.0]).repeat(5)
    q = gamma * t  # inf * 0 is NaN: counted as a zero
    assert sign_counts(q).tolist() == ternary_counts(t).tolist() == [15, 15, 10]
    assert sign_counts(q).dtype == torch.int64
