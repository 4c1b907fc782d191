"""``chimera perf rules``: one training step of each learning rule on the same ResMLP.

The classification setting of docs/algorithms.md#setting, #classification-tasks: ResMLP on
CIFAR-shaped inputs (3x32x32 -> 10
classes), ``d_hidden`` 512, 12 blocks, batch 128 (random data), AdamW (lr 1e-3) over the model,
the ``classification`` preset of the bridge rules (K 4, bridge_hidden 512) without the DFA
warm-up (``warmup_frac=0``: the steady-state cost, own credits at every step). Every rule starts
from the same seed. A step is ``rule.train_step(x, c)``; the rules are timed interleaved
(round-robin).

Breakdown (bridge rules): each rule's ``_credits`` (credit computation, e.g. the vector-Jacobian
product through G or the gradient of V) and ``_train_feedback`` (one Adam step of the bridge
net, its noisy rollouts through the real blocks included) are wrapped with synchronised timers
for ``repeats`` extra steps; ``rest`` is the remainder (forward, head, local backward passes,
optimizer step).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from chimera.bench.perf.results import fmt, goal, report
from chimera.bench.perf.target import Setup, perf_target
from chimera.bench.perf.timing import milliseconds, profile_case, synchronize, time_cases
from chimera.models import ResMLP
from chimera.rules import RULES, LearningRule, build_rule

RULE_NAMES = ("backprop", "dfa", "state_bridge", "credit_bridge")
GOALS = {"dfa": 1.0, "state_bridge": 1.5, "credit_bridge": 1.5}  # step / backprop step
COUNTS = {"cpu": (2, 10), "cuda": (5, 30)}  # (warmup, repeats); --quick: (1, 1)
PARTS = ("_credits", "_train_feedback")


def build(name: str, setup: Setup, d_hidden: int, blocks: int, input_shape: tuple[int, ...]
          ) -> LearningRule:
    torch.manual_seed(0)
    model = ResMLP(input_shape, 10, d_hidden=d_hidden, num_blocks=blocks).to(setup.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    extra = {"warmup_frac": 0.0} if "warmup_frac" in RULES.get(name).hparam_names else {}
    return build_rule(name, model, opt, loss_fn=F.cross_entropy, out_dim=10,
                      total_steps=10**9, preset="classification", **extra)


def breakdown(rule: LearningRule, step: Callable[[], Any], device: torch.device, calls: int
              ) -> dict[str, float]:
    """Mean ms per step of ``_credits``, ``_train_feedback`` and the rest, over ``calls`` steps
    with both methods wrapped in synchronised timers (removed afterwards)."""
    spent = dict.fromkeys(PARTS, 0.0)

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            synchronize(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(device)
            spent[part] += time.perf_counter() - start
            return out
        return wrapper

    for part in PARTS:
        setattr(rule, part, timed(part, getattr(rule, part)))
    try:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        synchronize(device)
        total = time.perf_counter() - start
    finally:
        for part in PARTS:
            delattr(rule, part)
    ms = {f"{part.strip('_')}_ms": spent[part] / calls * 1e3 for part in PARTS}
    return {**ms, "rest_ms": total / calls * 1e3 - sum(ms.values())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``chimera perf rules`` beyond the common ones."""
    parser.add_argument("--d-hidden", type=int, default=512, help="ResMLP width (default 512)")
    parser.add_argument("--blocks", type=int, default=12, help="ResMLP blocks (default 12)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")


@perf_target("rules", help="one training step of each learning rule vs backprop (ResMLP)",
             out="perf-rules.jsonl", options=add_arguments,
             positive=("d_hidden", "blocks", "batch"))
def run(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    d_hidden, blocks, batch, shape = ((16, 2, 8, (3, 4, 4)) if setup.quick
                                      else (args.d_hidden, args.blocks, args.batch, (3, 32, 32)))
    counts = setup.counts(*(1, 1) if setup.quick else COUNTS.get(setup.device.type, (2, 10)))
    x = torch.randn(batch, *shape, device=setup.device)
    c = torch.randint(0, 10, (batch,), device=setup.device)
    rules = [build(name, setup, d_hidden, blocks, shape) for name in RULE_NAMES]
    steps = [lambda rule=rule: rule.train_step(x, c) for rule in rules]
    times = time_cases(steps, setup.device, **counts)
    rows = []
    for name, rule, step, t in zip(RULE_NAMES, rules, steps, times, strict=True):
        rows.append({"rule": name, "d_hidden": d_hidden, "blocks": blocks, "batch": batch,
                     **milliseconds(t), **counts,
                     **breakdown(rule, step, setup.device, counts["repeats"]),
                     **profile_case(setup, name, step)})
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio_vs_backprop"] = r["median_ms"] / base
    goals = [goal(f"{r['rule']} step / backprop step (d {d_hidden} x {blocks} blocks, batch "
                  f"{batch})", r["ratio_vs_backprop"], "<=", GOALS[r["rule"]])
             for r in rows if r["rule"] in GOALS]
    columns = [("rule", lambda r: r["rule"]), ("step ms", lambda r: fmt(r["median_ms"])),
               ("x backprop", lambda r: fmt(r["ratio_vs_backprop"])),
               ("credits ms", lambda r: fmt(r["credits_ms"])),
               ("feedback training ms", lambda r: fmt(r["train_feedback_ms"])),
               ("rest ms", lambda r: fmt(r["rest_ms"]))]
    notes = [f"ResMLP d {d_hidden} x {blocks} blocks, batch {batch}, AdamW; bridge rules without "
             "DFA warm-up; breakdown from timed extra steps (rest = forward, head, local "
             "backward, optimizer step)"]
    report("perf-rules", setup, rows, columns, goals, notes)
    return rows
