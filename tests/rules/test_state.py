"""A rule's state dict restores it exactly: the resumed run continues like the original."""

import copy

import pytest
import torch
from test_rules import NON_BP, batch, make_rule, tiny_model


def _rule(name, model):
    warmup = {} if name == "dfa" else {"warmup_frac": 0.5}  # resume inside the DFA blend
    return make_rule(name, model, total_steps=8, **warmup)


def _run(rule, steps: int, start: int) -> None:
    for i in range(start, start + steps):
        rule.train_step(*batch(seed=i))


@pytest.mark.parametrize("name", NON_BP)
def test_resumed_rule_continues_exactly(name):
    torch.manual_seed(0)
    model = tiny_model()
    rule = _rule(name, model)
    _run(rule, 3, 0)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(rule.optimizer.state_dict()),
             copy.deepcopy(rule.state_dict()), torch.get_rng_state())
    _run(rule, 3, 3)

    model2 = tiny_model(seed=5)  # different initial weights: everything comes from the state
    model2.load_state_dict(saved[0])
    rule2 = _rule(name, model2)
    rule2.optimizer.load_state_dict(saved[1])
    rule2.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    assert rule2.step_count == 3
    _run(rule2, 3, 3)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    x, c = batch(seed=99)
    for a, b in zip(rule.credits(x, c), rule2.credits(x, c), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unbuilt_state_round_trips():
    rule = make_rule("credit_bridge", tiny_model())
    rule2 = make_rule("credit_bridge", tiny_model())
    rule2.load_state_dict(rule.state_dict())
    assert rule2.step_count == 0 and not rule2.state_dict()["built"]


def test_mismatched_state_is_a_clear_error():
    rule = make_rule("state_bridge", tiny_model())
    rule.train_step(*batch())
    with pytest.raises(ValueError, match="rule state of 'state_bridge' cannot be loaded into "
                                         "rule 'credit_bridge'"):
        make_rule("credit_bridge", tiny_model()).load_state_dict(rule.state_dict())
    wider = make_rule("state_bridge", tiny_model(), bridge_hidden=64)
    with pytest.raises(ValueError, match="rule state 'bridge' does not fit"):
        wider.load_state_dict(rule.state_dict())
    with pytest.raises(ValueError, match="cannot be loaded"):
        rule.load_state_dict({"weights": 1})
