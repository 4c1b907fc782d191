"""Integer-ternary training at its seams with the rest of torch: gradient accumulation, DDP,
gradient clipping, LR schedulers, maximize / weight decay / momentum, ONNX export and
torch.compile (docs/int_ternary.md, docs/algorithms.md#scaledoptum)."""

from __future__ import annotations

import io
import warnings

import onnxruntime
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from chimera.nn.int_ternary import (
    E_MAX,
    E_MIN,
    IntTernaryConv2d,
    IntTernaryLinear,
    group_scale,
)
from chimera.optim.scaled_optum import ScaledOptum, ternary_rate


def mlp(seed: int = 0, act_quant: str = "per_tensor") -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(IntTernaryLinear(8, 16, group_size=4, act_quant=act_quant), nn.ReLU(),
                         nn.Linear(16, 3))


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_micro_batches_accumulate_like_one_batch():
    """Integer inputs and a linear loss: every dL/dW is an exact multiple of 1/16, so the
    micro-batch sums equal the batch sums bit for bit and nothing can flip differently."""
    gen = torch.Generator().manual_seed(0)
    models = [nn.Sequential(IntTernaryLinear(6, 5, group_size=3, act_quant="none"))
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [ScaledOptum.for_model(m, lr=0.01, default_group_size=3, threshold=2,
                                  ternary_lr=4.0) for m in models]
    t0 = models[0][0].T.clone()
    for _ in range(4):
        x = torch.randint(-3, 4, (8, 6), generator=gen).float()
        c = torch.randint(-2, 3, (8, 5), generator=gen).float()
        for opt in opts:
            opt.zero_grad()
        (models[0](x) * c).sum().div(16).backward()  # one batch
        for half in (slice(0, 4), slice(4, 8)):  # two micro-batches, loss scaled by 1/2
            ((models[1](x[half]) * c[half]).sum().div(8) / 2).backward()
        assert torch.equal(models[0][0].weight.grad, models[1][0].weight.grad)
        for opt in opts:
            opt.step()
        assert states_equal(models[0], models[1])
    assert not torch.equal(models[0][0].T, t0) and int(models[0][0].step) == 4


def test_ddp_replicas_stay_identical(tmp_path):
    from _ddp_worker import train_replica

    mp.spawn(train_replica, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    s0, s1 = (r["state"] for r in ranks)
    for key in ("T", "E", "corr_accum", "pressure", "step", "weight"):
        assert torch.equal(s0[key], s1[key]), key
    assert int(s0["step"]) == 5 and not torch.equal(s0["T"], ranks[0]["t0"])


def test_clip_grad_norm_sees_and_scales_dl_dw():
    model = mlp()
    nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
    g = model[0].weight.grad.clone()
    grads = [p.grad for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([v.norm() for v in grads]))
    total = nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    assert total == pytest.approx(expected.item(), rel=1e-6) and total > g.norm()
    assert torch.allclose(model[0].weight.grad, g * (1e-3 / (total + 1e-6)))


def test_frozen_ternary_weight_keeps_the_integer_state():
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = ScaledOptum.for_model(model, lr=0.01, default_group_size=4, threshold=1)
    before = {k: v.clone() for k, v in model[0].state_dict().items() if k != "bias"}
    model(torch.randn(4, 8)).square().sum().backward()
    opt.step()
    assert all(torch.equal(v, model[0].state_dict()[k]) for k, v in before.items())
    assert model[0].weight.grad is None and model[0].bias.grad is not None


def test_one_cycle_lr_warms_the_ternary_rate_up_to_ternary_lr_and_weights_flip():
    model = mlp()
    opt = ScaledOptum.for_model(model, lr=0.01, default_group_size=4, threshold=4,
                                ternary_lr=8.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=20)  # cycles
    group = opt.ternary_group  # momentum too (cycle_momentum=True), without crashing
    assert ternary_rate(group) == pytest.approx(8.0 / 25) and group["ternary_lr"] == 8.0
    t0, rates = model[0].T.clone(), []
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        opt.zero_grad()
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rates.append(ternary_rate(group))
        sched.step()
    assert max(rates) == pytest.approx(8.0, rel=1e-3) and rates[-1] < 0.01
    assert opt.param_groups[0]["momentum"] > 0.94  # cycled 0.95 -> 0.85 -> 0.95
    assert (t0 != model[0].T).sum() >= 5  # the ternary weights moved under the schedule


def test_maximize_equals_descending_the_negated_loss():
    models = [mlp(), mlp()]
    opts = [ScaledOptum.for_model(m, lr=0.01, default_group_size=4, threshold=2, ternary_lr=4.0,
                                  momentum=0.5, weight_decay=0.1, maximize=maximize)
            for m, maximize in zip(models, (True, False), strict=True)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(16, 8, generator=gen)
        for model, opt, sign in zip(models, opts, (1, -1), strict=True):
            opt.zero_grad()
            (sign * model(x).square().mean()).backward()
            opt.step()
    assert states_equal(models[0], models[1])
    assert int(models[0][0].step) == 4


def test_weight_decay_is_decoupled_on_floats_and_a_no_op_on_ternary_weights():
    models = [mlp(), mlp()]
    opts = [ScaledOptum.for_model(m, lr=0.1, default_group_size=4, threshold=2, weight_decay=wd)
            for m, wd in zip(models, (0.0, 0.5), strict=True)]
    x = torch.randn(16, 8)
    for model, opt in zip(models, opts, strict=True):
        model(x).square().mean().backward()
        model[2].bias.grad.zero_()  # sign(0) = 0: only the decay moves it
        bias = model[2].bias.detach().clone()
        opt.step()
    assert torch.allclose(models[1][2].bias, bias * (1 - 0.1 * 0.5))
    assert torch.equal(models[0][2].bias, bias)
    for key in ("T", "pressure", "corr_accum", "E", "step"):
        assert torch.equal(getattr(models[0][0], key), getattr(models[1][0], key))


def test_momentum_takes_the_sign_of_the_heavy_ball_buffer():
    p = nn.Parameter(torch.zeros(2))
    opt = ScaledOptum([p], lr=1.0, momentum=0.5)
    for g in ([1.0, 1.0], [-1.5, -3.0]):  # buffers [1, 1], then [-1, -2.5]
        p.grad = torch.tensor(g)
        opt.step()
    assert p.tolist() == [0.0, 0.0]  # +(-1) then +1 for both entries
    assert opt.state[p]["sign_momentum"].tolist() == [-1.0, -2.5]
    with pytest.raises(ValueError, match="momentum"):
        ScaledOptum([p], momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        ScaledOptum([p], weight_decay=-1.0)
    with pytest.raises(ValueError, match="maximize"):
        ScaledOptum([p], maximize=1)


def test_power_of_two_is_exact_over_the_exponent_range():
    e = torch.arange(E_MIN, E_MAX + 1).float()
    assert torch.equal(torch.pow(2.0, e), torch.exp2(e))  # group_scale's values are unchanged
    layer = IntTernaryLinear(4, 1, group_size=2)
    with torch.no_grad():
        layer.E.copy_(torch.tensor([[E_MIN, E_MAX]]))
    assert layer.group_scale().tolist() == [[2.0 ** E_MIN, 2.0 ** E_MAX]]
    # the exponent-field form the optimizer's step uses gives the same bits over the range
    E = torch.arange(E_MIN, E_MAX + 1, dtype=torch.int8).view(1, -1)
    corr, step = torch.randint(-500, 500, E.shape), torch.tensor(3)
    assert torch.equal(group_scale(E, corr, step, 8, bits=True), group_scale(E, corr, step, 8))


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(IntTernaryConv2d(2, 4, 3, group_size=8), nn.ReLU(), nn.Flatten(),
                         IntTernaryLinear(64, 3, group_size=8))


def test_onnx_export_runs_and_matches_eager():
    model = cnn().eval()
    x = torch.randn(2, 2, 6, 6)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue())
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_in_train_mode_without_graph_breaks():
    model, reference = cnn().train(), cnn().train()
    x = torch.randn(2, 2, 6, 6)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().sum().backward()
    reference(x).square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert model[0].weight.grad.abs().sum() > 0 and model[0].get_last_stats() is not None
