import torch.nn.functional as F

from chimera.models.resmlp import ResMLP
from chimera.optim import build_optimizer
from chimera.rules import build_rule


def _rule(name, preset="classification", **hparams):
    model = ResMLP((12,), 5, d_hidden=16, num_blocks=3)
    return build_rule(name, model, build_optimizer("adamw", model, lr=1e-3),
                      loss_fn=F.cross_entropy, out_dim=5, total_steps=10, preset=preset,
                      bridge_hidden=32, **hparams)


def test_only_the_credit_bridge_warms_up_by_default():
    assert _rule("state_bridge").hparams["warmup_frac"] == 0.0
    assert _rule("state_bridge").warmup_weight == 1.0  # its own credit from the first step
    assert _rule("credit_bridge").hparams["warmup_frac"] == 0.2
    assert _rule("credit_bridge").warmup_weight == 0.0
    assert _rule("state_bridge", preset="toy").hparams["warmup_frac"] == 0.0


def test_the_state_bridge_still_takes_a_warm_up_when_asked():
    rule = _rule("state_bridge", warmup_frac=0.5)
    assert rule.hparams["warmup_frac"] == 0.5 and rule.warmup_weight == 0.0
