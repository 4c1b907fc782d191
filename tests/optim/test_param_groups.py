"""weight_decay_groups: biases and normalisation layers are not decayed, with every optimizer
of the registry that takes param groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chimera.optim import OPTIMIZERS, build_optimizer, optimizer_hparam_names, weight_decay_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.gn = nn.GroupNorm(2, 4, affine=True)
        self.rms = nn.RMSNorm(4)
        self.head = nn.Linear(4, 2)
        self.tied = self.head  # a shared module: its parameters count once
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


class ChannelNorm(nn.Module):
    """A user normalisation layer with a 2-d scale."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, 1))


def test_groups_split_matrices_from_biases_and_norms():
    model = Net()
    decay, rest = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert decay["params"] == [model.embed.weight, model.conv.weight, model.head.weight]
    expected_rest = [model.norm.weight, model.norm.bias, model.conv.bias, model.bn.weight,
                     model.bn.bias, model.gn.weight, model.gn.bias, model.rms.weight,
                     model.head.bias]
    assert rest["params"] == expected_rest


def test_custom_norm_modules_and_empty_groups():
    model = nn.Sequential(nn.Linear(4, 4), ChannelNorm())
    assert len(weight_decay_groups(model, 0.1)[0]["params"]) == 2  # the 2-d scale decays
    groups = weight_decay_groups(model, 0.1, no_decay_modules=(ChannelNorm,))
    assert [len(g["params"]) for g in groups] == [1, 2]
    only_biases = nn.Module()
    only_biases.b = nn.Parameter(torch.zeros(3))
    assert weight_decay_groups(only_biases, 0.1) == [
        {"params": [only_biases.b], "weight_decay": 0.0}]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.1"])
def test_bad_weight_decay_is_rejected(bad):
    with pytest.raises(ValueError, match="weight_decay"):
        weight_decay_groups(Net(), bad)


TAKES_GROUPS = [n for n in OPTIMIZERS.names()
                if n != "stac" and "weight_decay" in optimizer_hparam_names(n)]


def test_every_optimizer_with_weight_decay_but_stac_is_covered():
    assert {"sgd", "adam", "adamw", "lion", "chimera21"} <= set(TAKES_GROUPS)


@pytest.mark.parametrize("name", TAKES_GROUPS)
def test_only_the_decay_group_decays(name):
    """With zero gradients only weight decay moves a parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(name, weight_decay_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for (name_, p), old in zip(model.named_parameters(), before, strict=True):
        if p.ndim > 1:
            assert not torch.equal(p, old), name_
        else:
            assert torch.equal(p, old), name_


def test_stac_needs_named_by_for_groups_and_keeps_its_own_decay():
    """STAC builds its trunk/cap groups: param groups need ``named_by`` to be named, and their
    weight decays are replaced by STAC's own."""
    model = Net()
    with pytest.raises(ValueError, match="param groups with named_by=model"):
        build_optimizer("stac", weight_decay_groups(model, 0.1))
    opt = build_optimizer("stac", weight_decay_groups(model, 0.1), named_by=model,
                          weight_decay=0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.3]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
