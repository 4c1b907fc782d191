"""torch's OneCycleLR drives Chimera21 (lr and, through ``betas``, beta1) and ScaledOptum (the
float group's lr and momentum, the ternary group's rate ``ternary_lr * lr / max_lr``): each step
uses exactly the scheduled values, and a run saved and resumed mid-cycle ends where the
uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import assert_same_tensors
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

from chimera import Chimera21, ScaledOptum, ternarize
from chimera.optim.scaled_optum import ternary_rate

STEPS = 6


def _chimera21_setup():
    torch.manual_seed(0)
    model = ternarize(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                    nn.Linear(16, 3)), "chimera", warmup_steps=0)
    opt = Chimera21(model.parameters(), lr=1e-2)
    return model, opt, OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)


def _scaled_optum_setup():
    torch.manual_seed(0)
    model = ternarize(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
                      "int_ternary", skip=[], group_size=8)
    opt = ScaledOptum.for_model(model, lr=1e-2, threshold=4, ternary_lr=2.0, default_group_size=8)
    # one max per group: the float group's sign-SGD step, the ternary group's rate multiplier
    # (its rate is ternary_lr * lr / max_lr); the float group's momentum cycles too
    sched = OneCycleLR(opt, max_lr=[0.05, 1.0], total_steps=STEPS)
    return model, opt, sched


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _scheduled(setup, keys: tuple[str, ...]):
    """Run the schedule; returns the final state and the (group, key) values each step used."""
    model, opt, sched = setup()
    used = []
    for i in range(STEPS):
        used.append([{k: g[k] for k in keys} for g in opt.param_groups])
        _step(model, opt, i)
        sched.step()
    return model.state_dict(), used


def _by_hand(setup, values) -> dict:
    """The same run with every group's values written by hand before each step (no scheduler)."""
    model, opt, _ = setup()
    for i, step_values in enumerate(values):
        for group, v in zip(opt.param_groups, step_values, strict=True):
            group.update(v)
        _step(model, opt, i)
    return model.state_dict()


def _resumed(setup, path) -> dict:
    model, opt, sched = setup()
    for i in range(STEPS // 2):
        _step(model, opt, i)
        sched.step()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, path)
    model, opt, sched = setup()
    saved = torch.load(path, weights_only=False)
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    sched.load_state_dict(saved["s"])
    for i in range(STEPS // 2, STEPS):
        _step(model, opt, i)
        sched.step()
    return model.state_dict()


def test_one_cycle_lr_cycles_chimera21_lr_and_beta1(tmp_path):
    final, used = _scheduled(_chimera21_setup, ("lr", "betas"))
    beta1 = [step[0]["betas"][0] for step in used]
    assert beta1[0] == 0.95 and min(beta1) < 0.86  # OneCycleLR's default cycle 0.95 -> 0.85
    hand = [[{"lr": v["lr"], "beta1": v["betas"][0]} for v in step] for step in used]
    assert_same_tensors(final, _by_hand(_chimera21_setup, hand), "weights")
    fixed_beta = [[{"lr": v["lr"]} for v in step] for step in used]
    changed = _by_hand(_chimera21_setup, fixed_beta)
    assert any(not torch.equal(final[k], changed[k]) for k in final), "beta1 had no effect"
    assert_same_tensors(final, _resumed(_chimera21_setup, tmp_path / "s.pt"), "weights")


def test_one_cycle_lr_drives_both_scaled_optum_groups(tmp_path):
    final, used = _scheduled(_scaled_optum_setup, ("lr", "momentum"))
    assert len(used[0]) == 2 and used[0][1]["lr"] == pytest.approx(1.0 / 25)  # max / div_factor
    rates = [ternary_rate({**_scaled_optum_setup()[1].ternary_group, **step[1]}) for step in used]
    assert rates[0] == pytest.approx(2.0 / 25) and max(rates) == pytest.approx(2.0, rel=0.05)
    assert used[0][0]["momentum"] == 0.95 and min(s[0]["momentum"] for s in used) < 0.86
    assert_same_tensors(final, _by_hand(_scaled_optum_setup, used), "weights")
    start = _scaled_optum_setup()[0].state_dict()
    assert not torch.equal(final["0.T"], start["0.T"]), "the ternary weights never moved"
    assert_same_tensors(final, _resumed(_scaled_optum_setup, tmp_path / "s.pt"), "weights")
