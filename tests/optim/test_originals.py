"""Drop-in for the original projects' saved states: ``STAC.load_state_dict`` takes the states of
``stac-optimizer`` 0.1.2 (real ones, in tests/fixtures/originals, written by
make_stac_fixture.py) and ``Chimera21.load_state_dict`` those of Optimizer Chimera v0.13 (built
here to its format); the next step is the one the original would take, within 1e-6."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from chimera.optim import STAC, Chimera21

FIXTURES = Path(__file__).parents[1] / "fixtures" / "originals"

# ---------------------------------------------------------------- stac-optimizer 0.1.2


def tiny_model() -> nn.Module:
    """The model of make_stac_fixture.py."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"stac_0.1.2_{name}.pt", weights_only=True)


@pytest.mark.parametrize("wrap", ["plain", "compiled", "data_parallel"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", ["default", "amsgrad_maximize"])
def test_stac_continues_a_state_saved_by_stac_optimizer(name, foreach, wrap):
    saved = load_fixture(name)
    assert isinstance(saved["optimizer"]["state"][len(saved["model"]) - 1]["step"], int)
    model = tiny_model()
    model.load_state_dict(saved["model"])
    wrapped = {"plain": model, "compiled": torch.compile(model),
               "data_parallel": nn.DataParallel(model)}[wrap]
    opt = STAC(wrapped, **saved["hparams"], foreach=foreach)
    opt.load_state_dict(saved["optimizer"])
    assert opt.param_groups[-1]["layer_names"] == saved["optimizer"]["param_groups"][-1][
        "layer_names"]
    opt.zero_grad()
    nn.functional.mse_loss(model(saved["x"]), saved["y"]).backward()
    opt.step()
    for key, expected in saved["after_next_step"].items():
        torch.testing.assert_close(model.state_dict()[key], expected, rtol=0, atol=1e-6)
    cap_state = opt.state[opt.param_groups[-1]["params"][0]]
    assert torch.is_tensor(cap_state["step"]) and cap_state["step"].item() == 4


def test_stac_state_of_the_original_survives_a_save_and_load_of_ours():
    saved = load_fixture("default")
    model = tiny_model()
    model.load_state_dict(saved["model"])
    opt = STAC(model, **saved["hparams"])
    opt.load_state_dict(saved["optimizer"])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt2 = STAC(copy.deepcopy(model), **saved["hparams"])
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.param_groups[0]["foreach"] is None and opt2.nonfinite_skipped_steps == 0


# ---------------------------------------------------------------- Optimizer Chimera v0.13

ORIGINAL_GROUP_KEYS = (
    "lr", "beta1", "beta2", "eps_opt", "weight_decay", "rho_psi", "lambda_gate", "kappa_min",
    "kappa_max", "log_diagnostics", "zero_grad_policy", "idle_decay", "kappa_gate_mode",
    "noise_threshold", "gate_sharpness", "psi_storage",
)


def as_original(state_dict: dict) -> dict:
    """``state_dict`` in the original's format: its group keys only, ``step`` a Python int,
    ``m``/``v``/``psi`` as saved (int8 ``psi`` with ``psi_storage="int8"``)."""
    groups = [{k: g[k] for k in (*ORIGINAL_GROUP_KEYS, "params")} for g in
              state_dict["param_groups"]]
    states = {pid: {"m": s["m"], "v": s["v"], "psi": s["psi"], "step": int(s["step"].item())}
              for pid, s in state_dict["state"].items()}
    return copy.deepcopy({"state": states, "param_groups": groups})


def chimera_problem() -> tuple[list[nn.Parameter], list[list[torch.Tensor | None]]]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 4), (5,), (2, 2)]]
    grads = [[torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) > 0.3)
              if not (i == 2 and k == 1) else None for i, p in enumerate(params)]
             for k in range(5)]
    return params, grads


def run(opt, params, grads) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()


CHIMERA_CONFIGS = [
    {"lr": 0.05, "weight_decay": 0.01},
    {"lr": 0.05, "psi_storage": "int8", "zero_grad_policy": "inertia",
     "kappa_gate_mode": "noise_ratio", "lambda_gate": 2.0},
    {"lr": 0.02, "psi_storage": "int8", "zero_grad_policy": "decay", "log_diagnostics": True},
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", CHIMERA_CONFIGS)
def test_chimera21_continues_a_state_saved_by_the_original(config, foreach):
    params, grads = chimera_problem()
    native = Chimera21([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], **config)
    run(native, params, grads[:3])
    original = as_original(native.state_dict())
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    loaded_params = [nn.Parameter(p.detach().clone()) for p in params]
    loaded = Chimera21([{"params": loaded_params[:2]}, {"params": loaded_params[2:]}],
                       foreach=foreach)  # hyper-parameters come from the state
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    for p, q in zip(params, loaded_params, strict=True):
        for key, value in native.state[p].items():
            assert value.dtype == loaded.state[q][key].dtype, key
            assert torch.equal(value, loaded.state[q][key]), key  # int8 psi restored exactly
    group = loaded.param_groups[1]
    assert group["betas"] == (group["beta1"], group["beta2"]) and group["maximize"] is False
    assert group["foreach"] is foreach and group["lr"] == 0.01
    run(native, params, grads[3:])
    run(loaded, loaded_params, grads[3:])
    for p, q in zip(params, loaded_params, strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert loaded.last_diagnostics.keys() == native.last_diagnostics.keys()


def test_original_state_with_a_bad_step_is_rejected_before_loading():
    params, grads = chimera_problem()
    opt = Chimera21(params)
    run(opt, params, grads[:1])
    original = as_original(opt.state_dict())
    for bad in ("3", 2.5, float("nan"), -1, True):
        original["state"][0]["step"] = bad
        with pytest.raises(ValueError, match="'step'"):
            Chimera21([nn.Parameter(p.detach().clone()) for p in params]).load_state_dict(
                original)
