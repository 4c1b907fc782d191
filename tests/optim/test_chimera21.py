"""Chimera21 (docs/algorithms.md#chimera21): reference trajectory, validation, zero-grad policies,
noise gate,
int8 psi, foreach == for-loop, diagnostics, serialisation."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from chimera.optim._common import use_foreach
from chimera.optim.chimera21 import DIAGNOSTIC_KEYS, Chimera21

B1, B2, EPS, RHO, LAMBDA = 0.9, 0.999, 1e-8, 0.95, 0.1


def run_steps(opt: Chimera21, params: list[torch.Tensor], grads: list[list]) -> None:
    """Give ``params`` the gradients of ``grads[k]`` (None = no gradient) at step k."""
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = None if g is None else torch.as_tensor(g, dtype=p.dtype).reshape(p.shape)
        opt.step()


def param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def adam_terms(grads: list[float]) -> tuple[float, float, float]:
    """Hand computation (float64) of m, m_hat and s after the scalar gradients ``grads``."""
    m = v = 0.0
    for g in grads:
        m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
    t = len(grads)
    return m, m / (1 - B1**t), math.sqrt(v / (1 - B2**t))


# ---------------------------------------------------------------- reference trajectory

REFERENCE = [
    ([0.25, -0.5, 0.0], [0.89949876, -1.8994987, 0.5], [0.05, 0.05, 0.0]),
    ([-0.1, -0.5, 0.3], [0.86494684, -1.7985189, 0.42521331], [-0.0025, 0.0975, 0.05]),
    ([0.2, 0.1, -0.3], [0.80510885, -1.73064435, 0.4297758], [0.047625, 0.04262499, 0.0975]),
]


@pytest.mark.parametrize("foreach", [False, True])
def test_reference_trajectory(foreach):
    p = param([1.0, -2.0, 0.5])
    opt = Chimera21([p], lr=0.1, foreach=foreach)
    for grad, p_expected, psi_expected in REFERENCE:
        run_steps(opt, [p], [[grad]])
        torch.testing.assert_close(p.detach(), torch.tensor(p_expected), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            opt.state[p]["psi"], torch.tensor(psi_expected), rtol=0, atol=1e-6
        )
    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 3


# ---------------------------------------------------------------- validation and aliases

INVALID = [
    ({"lr": -0.1}, r"lr must be a number >= 0, got -0\.1$"),
    ({"lr": math.nan}, r"lr must be a number >= 0, got nan"),
    ({"lr": "0.1"}, r"lr must be a number >= 0, got '0\.1'"),
    ({"beta1": 1.0}, r"beta1 must be a number in \[0, 1\), got 1\.0$"),
    ({"beta1": -0.1}, r"beta1 must be"),
    ({"beta2": 1.0}, r"beta2 must be a number in \[0, 1\), got 1\.0$"),
    ({"betas": (0.9, 1.5)}, r"betas\[1\] must be a number in \[0, 1\), got 1\.5"),
    ({"betas": (0.9,)}, r"betas must be a tuple of 2 numbers in \[0, 1\), got \(0\.9,\)$"),
    ({"betas": 0.9}, r"betas must be a tuple of 2 numbers in \[0, 1\), got 0\.9$"),
    ({"eps_opt": 0.0}, r"eps_opt must be a number > 0, got 0\.0$"),
    ({"eps": -1e-8}, r"eps must be a number > 0, got -1e-08$"),
    ({"lr": math.inf}, r"lr must be a finite number >= 0, got inf$"),
    ({"lr": 10**400}, r"lr must be a finite number >= 0, got 1000"),
    ({"weight_decay": math.inf}, r"weight_decay must be a finite number >= 0, got inf$"),
    ({"lambda_gate": math.nan}, r"lambda_gate must be a number, got nan$"),
    ({"lambda_gate": -math.inf}, r"lambda_gate must be a finite number, got -inf$"),
    ({"noise_threshold": math.inf}, r"noise_threshold must be a finite number, got inf$"),
    ({"kappa_max": math.inf}, r"kappa_max must be a finite number, got inf$"),
    ({"gate_sharpness": math.inf}, r"gate_sharpness must be a finite number >= 0, got inf$"),
    ({"log_diagnostics": 1}, r"log_diagnostics must be True or False, got 1$"),
    ({"weight_decay": -1e-4}, r"weight_decay must be a number >= 0"),
    ({"rho_psi": 1.01}, r"rho_psi must be a number in \[0, 1\], got 1\.01$"),
    ({"rho_psi": -0.01}, r"rho_psi must be"),
    ({"kappa_min": 0.0}, r"kappa_min must be a number > 0, got 0\.0$"),
    ({"kappa_min": 1.5, "kappa_max": 1.0}, r"kappa_max must be a number >= kappa_min = 1\.5, got"),
    ({"zero_grad_policy": "bogus"}, r"zero_grad_policy must be one of standard, freeze.*'bogus'"),
    ({"idle_decay": 1.5}, r"idle_decay must be a number in \[0, 1\], got 1\.5$"),
    ({"idle_decay": -0.5}, r"idle_decay must be"),
    ({"kappa_gate_mode": "bogus"}, r"kappa_gate_mode must be one of none, noise_ratio, got 'bo"),
    ({"gate_sharpness": -1.0}, r"gate_sharpness must be a number >= 0, got -1\.0$"),
    ({"psi_storage": "fp16"}, r"psi_storage must be one of fp32, int8, got 'fp16'$"),
    ({"foreach": "yes"}, r"foreach must be None, True or False, got 'yes'"),
]


@pytest.mark.parametrize(("bad", "message"), INVALID)
def test_invalid_hyperparameters_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        Chimera21([param([1.0])], **bad)


@pytest.mark.parametrize(("bad", "message"), INVALID)
def test_invalid_group_overrides_raise_and_leave_the_optimizer_unchanged(bad, message):
    opt = Chimera21([param([1.0])])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [param([2.0])], **bad})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=message):
        Chimera21([{"params": [param([1.0])]}, {"params": [param([2.0])], **bad}])


def test_boundary_values_are_allowed():
    Chimera21(
        [param([1.0])],
        lr=0.0,
        beta1=0.0,
        beta2=0.0,
        rho_psi=1.0,
        idle_decay=0.0,
        kappa_min=1.0,
        kappa_max=1.0,
        gate_sharpness=0.0,
        weight_decay=0.0,
    )


def test_torch_style_aliases():
    opt = Chimera21([param([1.0])], betas=(0.8, 0.99), eps=1e-6)
    group = opt.param_groups[0]
    assert (group["beta1"], group["beta2"], group["eps_opt"]) == (0.8, 0.99, 1e-6)
    assert group["betas"] == (0.8, 0.99) and "eps" not in group
    opt.add_param_group({"params": [param([2.0])], "betas": (0.5, 0.6), "eps": 1e-4})
    group = opt.param_groups[1]
    assert (group["beta1"], group["beta2"], group["eps_opt"]) == (0.5, 0.6, 1e-4)
    # an explicit value equal to the alias is no conflict
    assert Chimera21([param([1.0])], beta1=0.8, betas=(0.8, 0.99)).defaults["beta1"] == 0.8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta1": 0.8, "betas": (0.7, 0.999)},
        {"beta2": 0.99, "betas": (0.9, 0.9)},
        {"eps_opt": 1e-6, "eps": 1e-7},
    ],
)
def test_conflicting_alias_raises(kwargs):
    with pytest.raises(ValueError, match="Conflicting"):
        Chimera21([param([1.0])], **kwargs)
    with pytest.raises(ValueError, match="Conflicting"):
        Chimera21([{"params": [param([1.0])], **kwargs}])


# ---------------------------------------------------------------- zero-grad policies


@pytest.mark.parametrize(
    ("policy", "idle_psi"),
    [
        ("standard", RHO * 0.05),  # psi_new as is (agreement 0)
        ("freeze", 0.05),  # old psi
        ("decay", 0.05 * 0.5),  # psi * idle_decay
        ("inertia", RHO * 0.05 + (1 - RHO) * 1.0),  # sign(m)^2 = 1
    ],
)
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_grad_policy_applies_only_where_g_is_exactly_zero(policy, idle_psi, foreach):
    lr = 0.1
    p = param([1.0, 1.0])
    opt = Chimera21([p], lr=lr, zero_grad_policy=policy, idle_decay=0.5, foreach=foreach)
    run_steps(opt, [p], [[[1.0, 1.0]]])
    p1 = p.detach().clone()
    run_steps(opt, [p], [[[0.0, 1.0]]])
    active_psi = RHO * 0.05 + (1 - RHO) * 1.0  # g != 0: agreement +1 in every policy
    psi = opt.state[p]["psi"]
    assert psi[0].item() == pytest.approx(idle_psi, abs=1e-7)
    assert psi[1].item() == pytest.approx(active_psi, abs=1e-7)
    for i, (grads, psi_i) in enumerate([([1.0, 0.0], idle_psi), ([1.0, 1.0], active_psi)]):
        _, m_hat, s = adam_terms(grads)
        kappa = min(max(math.exp(LAMBDA * psi_i), 0.5), 2.0)
        expected = p1[i].item() - lr * kappa * m_hat / (s + EPS)
        assert p[i].item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- noise-ratio gate


@pytest.mark.parametrize("foreach", [False, True])
def test_noise_ratio_gate_matches_hand_computation(foreach):
    lr, threshold, sharpness = 0.1, 19.0, 0.5
    grads = [1.0, -1.0]  # the sign flip makes the second step noisy
    p = param([0.0])
    opt = Chimera21(
        [p],
        lr=lr,
        kappa_gate_mode="noise_ratio",
        noise_threshold=threshold,
        gate_sharpness=sharpness,
        lambda_gate=5.0,
        foreach=foreach,
    )
    run_steps(opt, [p], [[[grads[0]]]])
    p1 = p.item()
    run_steps(opt, [p], [[[grads[1]]]])
    m, m_hat, s = adam_terms(grads)
    psi = RHO * (1 - RHO) * 1.0 + (1 - RHO) * math.copysign(1, m) * -1.0
    kappa = min(max(math.exp(5.0 * psi), 0.5), 2.0)
    noise = s / (abs(m_hat) + EPS)
    assert 17 < noise < 21  # the gate sits mid-range, so a wrong gate would show
    gate = 1 / (1 + math.exp(-sharpness * (threshold - noise)))
    gated = 1 + gate * (kappa - 1)
    assert abs(gated - kappa) > 1e-3
    assert p.item() == pytest.approx(p1 - lr * gated * m_hat / (s + EPS), abs=1e-6)


# ---------------------------------------------------------------- int8 psi storage


@pytest.mark.parametrize("foreach", [False, True])
def test_int8_psi_storage(foreach):
    grads = [[[0.25, -0.5, 0.0, 3.0]], [[-0.1, -0.5, 0.3, 2.0]]]
    runs = {}
    for storage in ("fp32", "int8"):
        p = param([1.0, -2.0, 0.5, 0.0])
        opt = Chimera21([p], lr=0.1, psi_storage=storage, foreach=foreach)
        run_steps(opt, [p], grads[:1])
        runs[storage] = (p, opt)
    (p32, o32), (p8, o8) = runs["fp32"], runs["int8"]
    psi8 = o8.state[p8]["psi"].clone()
    assert psi8.dtype == torch.int8 and o32.state[p32]["psi"].dtype == torch.float32
    assert torch.equal(psi8, torch.round(o32.state[p32]["psi"] * 127).to(torch.int8))
    # kappa of the first step used the unrounded psi: same parameters as fp32 storage
    assert torch.equal(p8, p32)
    # the next step decodes the stored value as psi / 127
    run_steps(o8, [p8], grads[1:])
    agreement = torch.tensor([-1.0, 1.0, 1.0, 1.0])  # sign(m) * sign(g) after step 2
    psi_new = RHO * psi8.float() / 127 + (1 - RHO) * agreement
    assert torch.equal(o8.state[p8]["psi"], torch.round(psi_new * 127).to(torch.int8))


def test_int8_psi_saturates_at_127():
    p = param([1.0, 1.0, 1.0])
    opt = Chimera21([p], rho_psi=0.0, psi_storage="int8")  # psi = agreement, in {-1, 0, 1}
    run_steps(opt, [p], [[[1.0, 1.0, 0.0]], [[-0.5, 1.0, 0.0]]])
    assert opt.state[p]["psi"].tolist() == [-127, 127, 0]


def test_switching_psi_storage_between_steps_converts_the_state():
    p = param([1.0, 2.0])
    opt = Chimera21([p], psi_storage="fp32")
    run_steps(opt, [p], [[[1.0, -1.0]]])
    opt.param_groups[0]["psi_storage"] = "int8"
    run_steps(opt, [p], [[[1.0, -1.0]]])
    psi = opt.state[p]["psi"]
    assert psi.dtype == torch.int8
    assert psi.tolist() == [round(0.0975 * 127)] * 2  # agreement +1 twice
    opt.param_groups[0]["psi_storage"] = "fp32"
    run_steps(opt, [p], [[[0.0, 0.0]]])
    assert opt.state[p]["psi"].dtype == torch.float32
    torch.testing.assert_close(opt.state[p]["psi"], RHO * psi.float() / 127)


# ---------------------------------------------------------------- foreach == for-loop


def parity_setup(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (), (2, 3, 2), (0, 3), (4,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    groups = [
        {"params": params[:4], "lr": 0.05},
        {"params": params[4:], "lr": 0.01, "weight_decay": 0.0},
    ]
    return params, groups


def parity_grads(params, steps: int, seed: int = 1) -> list[list]:
    """Gradients with exact zeros; params[5] never gets one; params[2] skips step 2."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        step = []
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) > 0.3)
            step.append(None if i == 5 or (i == 2 and k == 2) else g)
        out.append(step)
    return out


@pytest.mark.parametrize("psi_storage", ["fp32", "int8"])
@pytest.mark.parametrize("kappa_gate_mode", ["none", "noise_ratio"])
@pytest.mark.parametrize("policy", ["standard", "freeze", "decay", "inertia"])
def test_foreach_path_matches_for_loop_path_bit_exactly(policy, kappa_gate_mode, psi_storage):
    """On CPU the foreach kernels fall back to the same per-tensor kernels in the same order,
    so the two paths agree bit for bit (parameters and every state tensor)."""
    hp = dict(
        weight_decay=0.1,
        zero_grad_policy=policy,
        idle_decay=0.7,
        kappa_gate_mode=kappa_gate_mode,
        psi_storage=psi_storage,
        lambda_gate=2.0,
    )
    results = []
    for foreach in (False, True):
        params, groups = parity_setup()
        opt = Chimera21(groups, foreach=foreach, **hp)
        run_steps(opt, params, parity_grads(params, steps=6))
        results.append((params, opt))
    (params1, opt1), (params2, opt2) = results
    for p1, p2 in zip(params1, params2, strict=True):
        assert torch.equal(p1, p2)
        s1, s2 = opt1.state.get(p1, {}), opt2.state.get(p2, {})
        assert s1.keys() == s2.keys()
        for key in s1:
            assert s1[key].dtype == s2[key].dtype, key
            assert torch.equal(s1[key], s2[key]), key
    assert params1[5] not in opt1.state and params2[5] not in opt2.state  # grad None: no state
    assert opt1.state[params1[2]]["step"].item() == 5  # skipped one step
    assert opt1.state[params1[4]]["m"].shape == (0, 3)


def test_foreach_none_picks_the_for_loop_path_on_cpu():
    params = [param([1.0])]
    params[0].grad = torch.ones(1)
    assert not use_foreach(None, params)
    assert use_foreach(True, params) and not use_foreach(False, params)


# ---------------------------------------------------------------- diagnostics


def test_diagnostics_are_absent_unless_requested():
    p = param([1.0, 2.0])
    opt = Chimera21([p])
    assert opt.last_diagnostics == {}
    run_steps(opt, [p], [[[1.0, 0.5]]])
    assert opt.last_diagnostics == {}


@pytest.mark.parametrize("foreach", [False, True])
def test_diagnostics_keys_and_values(foreach):
    params, groups = parity_setup()
    lrs = [0.05] * 4 + [0.01] * 2
    opt = Chimera21(
        groups,
        log_diagnostics=True,
        kappa_gate_mode="noise_ratio",
        lambda_gate=3.0,
        foreach=foreach,
    )
    grads = parity_grads(params, steps=3)
    run_steps(opt, params, grads[:2])
    before = [p.detach().clone() for p in params]
    run_steps(opt, params, grads[2:])
    diag = opt.last_diagnostics
    assert tuple(diag) == DIAGNOSTIC_KEYS
    assert all(type(v) is float for v in diag.values())
    with_grad = [i for i, g in enumerate(grads[2]) if g is not None]
    g_all = torch.cat([grads[2][i].flatten() for i in with_grad])
    assert diag["count"] == g_all.numel() == 12 + 5 + 12  # params 0, 1, 3 (4 is empty)
    assert diag["zero_grad_ratio"] == pytest.approx((g_all == 0).float().mean().item())
    assert diag["zero_grad_ratio"] + diag["active_grad_ratio"] == pytest.approx(1.0)

    # recompute kappa, noise and the update from the state (weight decay is 0 here)
    kappas, noises, eff_lrs, updates, psis = [], [], [], [], []
    for i in with_grad:
        state = opt.state[params[i]]
        t = state["step"].item()
        m_hat = state["m"] / (1 - B1**t)
        s = (state["v"] / (1 - B2**t)).sqrt()
        noise = s / (m_hat.abs() + EPS)
        kappa = torch.exp(3.0 * state["psi"]).clamp(0.5, 2.0)
        kappa = 1 + torch.sigmoid(4.0 * (2.0 - noise)) * (kappa - 1)
        kappas.append(kappa.flatten())
        noises.append(noise.flatten())
        eff_lrs.append((lrs[i] * kappa / (s + EPS)).flatten())
        updates.append((before[i] - params[i].detach()).flatten())
        psis.append(state["psi"].flatten())
    kappa, noise, eff_lr, update, psi = map(torch.cat, (kappas, noises, eff_lrs, updates, psis))
    assert 0.5 <= diag["min_kappa"] <= diag["mean_kappa"] <= diag["max_kappa"] <= 2.0
    assert diag["std_kappa"] > 0
    expected = {
        "mean_kappa": kappa.mean(),
        "std_kappa": kappa.std(correction=0),
        "min_kappa": kappa.min(),
        "max_kappa": kappa.max(),
        "mean_noise_ratio": noise.mean(),
        "mean_effective_lr": eff_lr.mean(),
        "active_mean_effective_lr": eff_lr[g_all != 0].mean(),
        "applied_update_norm": update.norm(),
        "param_update_ratio": update.norm()
        / torch.cat([before[i].flatten() for i in with_grad]).norm(),
        "mean_update_abs": update.abs().mean(),
        "max_update_abs": update.abs().max(),
        "psi_abs_mean": psi.abs().mean(),
        "psi_saturation_ratio": (psi.abs() >= 0.999).float().mean(),
        "collision_score": (kappa.log().abs() * noise).mean(),
    }
    for key, value in expected.items():
        assert diag[key] == pytest.approx(value.item(), rel=1e-4, abs=1e-7), key


def test_diagnostics_do_not_change_the_trajectory():
    results = []
    for log in (False, True):
        params, groups = parity_setup()
        opt = Chimera21(groups, log_diagnostics=log, foreach=True, psi_storage="int8")
        run_steps(opt, params, parity_grads(params, steps=4))
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_diagnostics_without_any_gradient_and_saturation():
    p = param([1.0, 2.0])
    opt = Chimera21([p], log_diagnostics=True, rho_psi=0.0)
    opt.step()
    assert opt.last_diagnostics == {}  # the original project's value
    run_steps(opt, [p], [[[1.0, 0.0]]])
    diag = opt.last_diagnostics
    assert diag["psi_saturation_ratio"] == 0.5 and diag["zero_grad_ratio"] == 0.5
    run_steps(opt, [p], [[[0.0, 0.0]]])
    assert opt.last_diagnostics["active_mean_effective_lr"] == 0.0  # no active element


# ---------------------------------------------------------------- errors, state, copies


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = Chimera21(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_closure_value_is_returned_and_evaluated_with_grad():
    p = param([1.0, -1.0])
    opt = Chimera21([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0
    assert p[0].item() < 1.0


@pytest.mark.parametrize("psi_storage", ["fp32", "int8"])
def test_state_dict_round_trip_then_identical_continuation(psi_storage):
    params, groups = parity_setup()
    opt = Chimera21(groups, psi_storage=psi_storage, zero_grad_policy="inertia")
    grads = parity_grads(params, steps=5)
    run_steps(opt, params, grads[:2])
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _, groups2 = parity_setup()
    groups2[0]["params"], groups2[1]["params"] = params2[:4], params2[4:]
    opt2 = Chimera21(groups2)  # hyper-parameters come from the state dict
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["psi_storage"] == psi_storage
    for p, p2 in zip(params, params2, strict=True):
        for key, value in opt.state.get(p, {}).items():
            assert value.dtype == opt2.state[p2][key].dtype, key
    run_steps(opt, params, grads[2:])
    run_steps(opt2, params2, grads[2:])
    for p, p2 in zip(params, params2, strict=True):
        assert torch.equal(p, p2)
        for key, value in opt.state.get(p, {}).items():
            assert torch.equal(value, opt2.state[p2][key]), key


def test_deepcopy_continues_identically_and_keeps_diagnostics():
    params, groups = parity_setup()
    opt = Chimera21(groups, log_diagnostics=True, psi_storage="int8")
    grads = parity_grads(params, steps=4)
    run_steps(opt, params, grads[:2])
    params2, opt2 = copy.deepcopy((params, opt))
    assert opt2.last_diagnostics == opt.last_diagnostics != {}
    run_steps(opt, params, grads[2:])
    run_steps(opt2, params2, grads[2:])
    assert all(torch.equal(a, b) for a, b in zip(params, params2, strict=True))
    assert opt2.last_diagnostics == opt.last_diagnostics


# ---------------------------------------------------------------- betas for schedulers, maximize


def test_betas_and_beta1_beta2_stay_one_value_in_every_group():
    opt = Chimera21([param([1.0])], beta1=0.8)
    opt.add_param_group({"params": [param([2.0])], "beta2": 0.9})
    assert opt.defaults["betas"] == (0.8, 0.999)
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.999), (0.8, 0.9)]
    group = opt.param_groups[0]
    group["betas"] = (0.7, 0.95)  # what torch's schedulers write
    assert (group["beta1"], group["beta2"]) == (0.7, 0.95)
    group["beta1"] = 0.6
    group.update(beta2=0.5)
    assert group["betas"] == (0.6, 0.5)
    with pytest.raises(ValueError, match=r"betas\[0\] must be a number in \[0, 1\)"):
        group["betas"] = (1.5, 0.9)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        copied.param_groups[0]["betas"] = (0.3, 0.4)
        assert copied.param_groups[0]["beta1"] == 0.3
    state = opt.state_dict()
    assert state["param_groups"][0]["betas"] == (0.6, 0.5)
    opt2 = Chimera21([param([1.0])])
    opt2.add_param_group({"params": [param([2.0])]})
    opt2.load_state_dict(state)
    opt2.param_groups[1]["betas"] = (0.2, 0.3)
    assert opt2.param_groups[1]["beta1"] == 0.2


@pytest.mark.parametrize("betas", [(0.5, 0.999), "x", (0.9,)])
def test_saved_betas_must_equal_beta1_and_beta2(betas):
    opt = Chimera21([param([1.0])])
    state = opt.state_dict()
    state["param_groups"][0]["betas"] = betas
    with pytest.raises(ValueError, match="loaded param group 0: betas"):
        Chimera21([param([1.0])]).load_state_dict(state)


def test_a_deepcopied_optimizer_loads_its_own_state():
    """torch's ``__setstate__`` (deepcopy, pickle, accelerate's prepare) adds
    ``differentiable`` to ``defaults``; the saved groups lack it and still load."""
    opt = copy.deepcopy(Chimera21([param([1.0])]))
    assert "differentiable" in opt.defaults
    opt.load_state_dict(Chimera21([param([1.0])]).state_dict())
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_one_cycle_lr_cycles_the_beta1_the_step_uses():
    """OneCycleLR(cycle_momentum=True) writes group['betas'] each step; the trajectory equals a
    for-loop of steps with beta1 (and lr) set by hand to what the scheduler chose."""
    grads = parity_grads(parity_setup()[0], steps=6)
    params, groups = parity_setup()
    opt = Chimera21(groups, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=10, base_momentum=0.8, max_momentum=0.95
    )
    ref_params, ref_groups = parity_setup()
    ref = Chimera21(ref_groups, foreach=False)  # lr and beta1 set by hand
    const_params, const_groups = parity_setup()
    const = Chimera21(const_groups, beta1=0.95)  # lr set by hand, beta1 never cycled
    used = []
    for step_grads in grads:
        used.append(opt.param_groups[0]["beta1"])
        for group, ref_group, const_group in zip(
            opt.param_groups, ref.param_groups, const.param_groups, strict=True
        ):
            ref_group["lr"] = const_group["lr"] = group["lr"]
            ref_group["beta1"] = group["betas"][0]
        run_steps(opt, params, [step_grads])
        run_steps(ref, ref_params, [step_grads])
        run_steps(const, const_params, [step_grads])
        sched.step()
    assert used[0] == pytest.approx(0.95) and len(set(used)) == len(used)  # cycled every step
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params, strict=True))
    assert not torch.equal(params[0], const_params[0])


@pytest.mark.parametrize("foreach", [False, True])
def test_maximize_equals_stepping_on_the_negated_gradient(foreach):
    grads = parity_grads(parity_setup()[0], steps=4)
    negated = [[None if g is None else -g for g in step] for step in grads]
    results = []
    for maximize, step_grads in ((True, grads), (False, negated)):
        params, groups = parity_setup()
        opt = Chimera21(groups, maximize=maximize, foreach=foreach, zero_grad_policy="inertia",
                        kappa_gate_mode="noise_ratio", psi_storage="int8", weight_decay=0.1)
        run_steps(opt, params, step_grads)
        results.append((params, opt))
    (p1, o1), (p2, o2) = results
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    for a, b in zip(p1, p2, strict=True):
        for key, value in o1.state.get(a, {}).items():
            assert torch.equal(value, o2.state[b][key]), key
    assert not torch.equal(p1[0], parity_setup()[0][0])
