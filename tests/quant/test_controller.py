import math

import pytest
import torch

from chimera.nn.bit_layers import BitLinear
from chimera.quant.controller import TargetBitsController


def test_target_zero_ratio_from_bits_or_given():
    assert TargetBitsController().target_zero_ratio == pytest.approx(0.63038, abs=5e-6)
    assert TargetBitsController(branch="dense").target_zero_ratio == pytest.approx(0.07914,
                                                                                   abs=5e-6)
    assert TargetBitsController(target_bits=1.5).target_zero_ratio == pytest.approx(0.5)
    assert TargetBitsController(target_zero_ratio=0.2).target_zero_ratio == 0.2


def test_update_steps_toward_the_band_and_keeps_it():
    c = TargetBitsController(target_zero_ratio=0.5, tolerance=0.125, step_size=0.25)
    assert c.last_error is None
    assert c.update(0.5, 0.25) == 0.75 and c.last_error == -0.25  # too few zeros: raise alpha
    assert c.update(0.5, 0.75) == 0.25 and c.last_error == 0.25  # too many zeros: lower alpha
    for zero_ratio in (0.375, 0.5, 0.625):  # inside the band, edges included
        assert c.update(0.5, zero_ratio) == 0.5
    assert c.last_error == 0.125


def test_update_clips_alpha():
    c = TargetBitsController(target_zero_ratio=0.5, step_size=0.5, alpha_min=0.25, alpha_max=1.0)
    assert c.update(0.75, 0.0) == 1.0
    assert c.update(0.5, 1.0) == 0.25
    assert c.update(3.0, 0.5) == 1.0  # out-of-range alpha inside the band is still clipped


def test_controller_drives_a_layer_to_the_target_zero_ratio():
    torch.manual_seed(0)
    layer = BitLinear(64, 64, warmup_steps=0, alpha_target=0.0).eval()
    c = TargetBitsController(target_bits=1.32)
    x = torch.randn(4, 64)
    for _ in range(60):
        layer(x)
        layer.alpha_target = c.update(layer.alpha_target, layer.get_last_stats()["zero_ratio"])
    layer(x)
    assert abs(layer.get_last_stats()["zero_ratio"] - c.target_zero_ratio) <= c.tolerance


def test_state_dict_round_trip():
    c = TargetBitsController(target_bits=1.2, branch="sparse", tolerance=0.01, alpha_max=2.0)
    c.update(0.7, 0.1)
    other = TargetBitsController()
    other.load_state_dict(c.state_dict())
    assert other.state_dict() == c.state_dict()
    assert other.update(0.7, 0.9) == c.update(0.7, 0.9)


@pytest.mark.parametrize(("change", "match"), [
    ({"extra": 1}, "unexpected"),
    ({"tolerance": -1.0}, "tolerance"),
    ({"last_error": "x"}, "last_error"),
    ({"last_error": math.nan}, "last_error"),
    ({"step_size": math.inf}, "step_size"),
])
def test_load_state_dict_rejects_bad_state(change, match):
    c = TargetBitsController()
    with pytest.raises(ValueError, match=match):
        c.load_state_dict({**c.state_dict(), **change})
    assert c.state_dict() == TargetBitsController().state_dict()  # unchanged on failure


def test_load_state_dict_rejects_missing_keys():
    state = TargetBitsController().state_dict()
    del state["step_size"]
    with pytest.raises(ValueError, match="missing"):
        TargetBitsController().load_state_dict(state)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_bits": 1.6}, "bits"),
    ({"target_bits": -0.1}, "target_bits"),
    ({"target_bits": 0.5, "branch": "dense"}, "bits"),
    ({"branch": "both"}, "branch"),
    ({"target_zero_ratio": 1.5}, "target_zero_ratio"),
    ({"tolerance": -0.01}, "tolerance"),
    ({"step_size": 0.0}, "step_size"),
    ({"step_size": -1.0}, "step_size"),
    ({"alpha_min": -0.5}, "alpha_min"),
    ({"alpha_min": 1.0, "alpha_max": 0.5}, "alpha_max"),
    ({"tolerance": True}, "tolerance"),
    ({"target_bits": math.nan}, "target_bits"),
    ({"target_zero_ratio": math.nan}, "target_zero_ratio"),
    ({"tolerance": math.inf}, "^tolerance must be a finite number >= 0, got inf$"),
    ({"step_size": math.inf}, "^step_size must be a finite number > 0, got inf$"),
    ({"step_size": math.nan}, "^step_size must be a number > 0, got nan$"),
    ({"alpha_min": math.inf}, "^alpha_min must be a finite number >= 0, got inf$"),
    ({"alpha_max": math.inf}, "^alpha_max must be a finite number >= 0.0, got inf$"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TargetBitsController(**kwargs)


@pytest.mark.parametrize(("alpha", "zero_ratio", "match"), [
    (0.5, 1.5, "^current_zero_ratio must be"), (0.5, -0.1, "zero_ratio"),
    (0.5, math.nan, "zero_ratio"),
    (math.nan, 0.5, "alpha"), ("0.5", 0.5, "alpha"),
    (math.inf, 0.5, "^alpha must be a finite number, got inf$"),
    (-math.inf, 0.5, "^alpha must be a finite number, got -inf$"),
    (0.5, math.inf, "zero_ratio"),
])
def test_invalid_update_arguments(alpha, zero_ratio, match):
    with pytest.raises(ValueError, match=match):
        TargetBitsController().update(alpha, zero_ratio)


def test_original_names_of_the_controller():
    """The original project's keyword (``current_zero_ratio``) and alias
    (``SparseBranchController``)."""
    from chimera.quant import SparseBranchController

    c = SparseBranchController(target_zero_ratio=0.5, tolerance=0.0, step_size=0.25)
    assert SparseBranchController is TargetBitsController
    assert c.update(alpha=0.5, current_zero_ratio=0.25) == 0.75 and c.last_error == -0.25
    with pytest.raises(TypeError, match="zero_ratio"):
        c.update(0.5, zero_ratio=0.25)
