"""pytorch-optimizer: Chimera21 added to its registry is built by ``create_optimizer`` (its
weight-decay groups, its Lookahead wrapper), and its Lookahead wraps STAC; both follow the
Lookahead equation ``slow <- slow + alpha * (fast_k - slow)`` around Chimera's own steps and
survive a state_dict round trip."""

from __future__ import annotations

import pytest
import torch
from pytorch_optimizer import Lookahead, create_optimizer, load_optimizer
from pytorch_optimizer.optimizer import OPTIMIZERS as PO_OPTIMIZERS
from torch import nn

from chimera import STAC, Chimera21, ternarize

K, ALPHA = 3, 0.5


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 12),
                          nn.ReLU(), nn.Linear(12, 3))
    return ternarize(model, "chimera", warmup_steps=0)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _assert_lookahead_equation(build) -> None:
    """After K steps the weights are ``start + ALPHA * (fast - start)``, ``fast`` being the
    weights K steps of the bare optimizer reach (same model, data and hyper-parameters)."""
    bare_model = _model()
    start = [p.detach().clone() for p in bare_model.parameters()]
    _train(bare_model, build(bare_model), K)
    model = _model()
    _train(model, Lookahead(build(model), k=K, alpha=ALPHA), K)
    for p0, fast, p in zip(start, bare_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, p0 + ALPHA * (fast - p0))


def _assert_round_trip(build, path) -> None:
    """Saving the wrapped optimizer mid-run and loading it into a fresh one continues exactly."""
    model, twin = _model(), _model()
    opt = Lookahead(build(model), k=K, alpha=ALPHA)
    _train(model, opt, 2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    saved = torch.load(path, weights_only=False)
    twin.load_state_dict(saved["model"])
    twin_opt = Lookahead(build(twin), k=K, alpha=ALPHA)
    twin_opt.load_state_dict(saved["opt"])
    _train(model, opt, 4)
    _train(twin, twin_opt, 4)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def registered(monkeypatch):
    """Chimera21 in pytorch-optimizer's registry (its documented names are lower case)."""
    monkeypatch.setitem(PO_OPTIMIZERS, "chimera21", Chimera21)


def test_create_optimizer_builds_chimera21_with_weight_decay_groups(registered):
    assert load_optimizer("Chimera21") is Chimera21
    model = _model()
    opt = create_optimizer(model, "chimera21", lr=1e-2, weight_decay=0.01)
    assert isinstance(opt, Chimera21)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model[1].weight) in no_decay_ids and id(model[0].bias) in no_decay_ids
    assert id(model[3].weight_master) not in no_decay_ids
    wrapped = create_optimizer(_model(), "chimera21", lr=1e-2, use_lookahead=True)
    assert isinstance(wrapped, Lookahead) and isinstance(wrapped.optimizer, Chimera21)


def test_create_optimizer_builds_stac_when_given_the_model(monkeypatch):
    """pytorch-optimizer passes unnamed param groups; ``named_by`` (forwarded through its
    kwargs) names them, so STAC gets the same trunk/cap partition as ``STAC(model)``."""
    monkeypatch.setitem(PO_OPTIMIZERS, "stac", STAC)
    model = _model()
    opt = create_optimizer(model, "stac", lr=1e-2, weight_decay=0.01, named_by=model)
    layers = ("trunk_layer_names", "cap_layer_names")
    assert isinstance(opt, STAC)
    assert [getattr(opt.partition, n) for n in layers] == [
        getattr(STAC(model).partition, n) for n in layers]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01]


@pytest.mark.parametrize("name", ["chimera21", "stac"])
def test_lookahead_wraps_chimera_optimizers(tmp_path, name):
    def build(model: nn.Module) -> torch.optim.Optimizer:
        if name == "stac":
            return STAC(model, lr=1e-2)
        return Chimera21(model.parameters(), lr=1e-2)

    _assert_lookahead_equation(build)
    _assert_round_trip(build, tmp_path / "state.pt")
