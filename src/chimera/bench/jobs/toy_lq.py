"""``chimera toy-lq``: credit quality of the learning rules on the toy LQ problem
(docs/algorithms.md#toy-lq).

The toy's weight scale is ``w_std`` (``W_l`` entries N(0, w_std²/d)): docs/algorithms.md#toy-lq
names 0.03 "or
as documented"; the default here is :data:`DEFAULT_W_STD` = 0.3 because at 0.03 the costates
barely change along the depth, so broadcasting the exact terminal costate to every layer already
scores a cosine of 0.997 and the check cannot tell a bridge from that (docs/rules.md).

The forward net (linear residual layers, head C) stays fixed; only the rules' feedback networks
train (``LearningRule.train_feedback``), one fresh batch of 256 per step. The diagnostics are
about credit quality, and a fixed forward net keeps the exact costates a stationary target
(training it would drive the loss, and with it the costates, to zero). The final diagnostics are
taken on a held-out batch of 512. A run's records: ``step`` every ``steps // 20`` steps
(bridge residual, costate cosine) and one ``final`` (all diagnostics, the terminal-broadcast
reference cosine, wall time).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from chimera._validate import known_keys
from chimera.bench.workers import run_calls
from chimera.data.toy_lq_problem import make_toy_lq, toy_lq_loss
from chimera.registry import Registry
from chimera.rules import (
    RULES,
    build_rule,
    costate_cosine,
    credit_diagnostics,
    exact_costates,
)
from chimera.run.records import RecordWriter

BATCH_SIZE = 256
EVAL_SIZE = 512
EVAL_SEED_OFFSET = 10_000  # the eval batch's generator seed is seed + this
DEFAULT_W_STD = 0.3

# variant -> (rule, hyper-parameters over the "toy" preset)
TOY_VARIANTS: Registry[tuple[str, dict[str, Any]]] = Registry("toy LQ variant")
for _name, _entry in {
    "backprop": ("backprop", {}),
    "dfa": ("dfa", {}),
    "state_bridge": ("state_bridge", {}),
    "credit_bridge": ("credit_bridge", {}),
    "credit_bridge_tgw0": ("credit_bridge", {"term_grad_weight": 0.0}),
    "credit_bridge_noslope": ("credit_bridge", {"slope_weight": 0.0}),
}.items():
    TOY_VARIANTS.register(_name)(_entry)
DEFAULT_VARIANTS = ("dfa", "state_bridge", "credit_bridge", "credit_bridge_tgw0")


def variant_hparams(variant: str, overrides: Mapping[str, Any] | None = None
                    ) -> tuple[str, dict[str, Any]]:
    """``(rule, hyper-parameters)`` of ``variant``: its own over the "toy" preset, then those of
    ``overrides`` that its rule takes (a rule taking none of them ignores them)."""
    rule_name, hparams = TOY_VARIANTS.get(variant)
    names = RULES.get(rule_name).hparam_names
    return rule_name, {**hparams, **{k: v for k, v in (overrides or {}).items() if k in names}}


def check_overrides(variants: Sequence[str], overrides: Mapping[str, Any] | None) -> None:
    """``ValueError`` for a key of ``overrides`` that no variant's rule takes or a value its
    rules reject (the rules' own checks, on a throw-away toy model)."""
    if not overrides:
        return
    rules = {TOY_VARIANTS.get(v)[0] for v in variants}
    taken = {k for r in rules for k in RULES.get(r).hparam_names}
    known_keys(f"the rules of variants {', '.join(variants)}", overrides, sorted(taken),
               "hyper-parameter")
    problem = make_toy_lq(0)
    for v in variants:
        rule_name, hparams = variant_hparams(v, overrides)
        build_rule(rule_name, problem.model(), None, loss_fn=toy_lq_loss,
                   out_dim=problem.out_dim, total_steps=1, preset="toy", **hparams)


def run_toy_lq_one(variant: str, seed: int, steps: int, writer: RecordWriter | None = None,
                   w_std: float = DEFAULT_W_STD, overrides: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Train one variant's feedback networks for ``steps`` steps (hyper-parameters as
    :func:`variant_hparams`); returns the final record."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    rule_name, hparams = variant_hparams(variant, overrides)
    problem = make_toy_lq(seed, w_std=w_std)
    torch.manual_seed(seed)
    model = problem.model()
    rule = build_rule(rule_name, model, None, loss_fn=toy_lq_loss, out_dim=problem.out_dim,
                      total_steps=steps, preset="toy", **hparams)
    extra = "".join(f",{k}={v}" for k, v in sorted(hparams.items())
                    if k in (overrides or {}))
    config_id = f"toy_lq-{variant}" + (f"[{extra[1:]}]" if extra else "")
    identity = {"run_id": f"{config_id}-s{seed}", "config_id": config_id,
                "task": "toy_lq", "variant": variant, "rule": rule_name, "rule_hparams": hparams,
                "seed": seed, "steps": steps, "batch_size": BATCH_SIZE, "w_std": w_std}
    log = writer.with_identity(**identity) if writer is not None else None
    data_gen = torch.Generator().manual_seed(seed)
    x_eval, c_eval = problem.sample(EVAL_SIZE, torch.Generator().manual_seed(
        seed + EVAL_SEED_OFFSET))
    costates = exact_costates(model, x_eval, c_eval, toy_lq_loss)
    log_every = max(steps // 20, 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        info = rule.train_feedback(*problem.sample(BATCH_SIZE, data_gen))
        if log is not None and step % log_every == 0:
            cosine = costate_cosine(rule.credits(x_eval, c_eval), costates)
            log.write("step", step=step, loss=info["loss"], costate_cosine=cosine,
                      bridge_residual=info.get("bridge_residual"))
    train_time = time.perf_counter() - start
    diag = credit_diagnostics(rule, x_eval, c_eval,
                              generator=torch.Generator().manual_seed(seed))
    final = {**identity, **diag, "train_time_s": train_time,
             "terminal_broadcast_cosine": costate_cosine([costates[-1]] * len(costates),
                                                         costates)}
    if log is not None:
        log.write("final", **{k: v for k, v in final.items() if k not in identity})
    return final


def _run_into(path: str | None, variant: str, seed: int, steps: int, w_std: float,
              overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:func:`run_toy_lq_one` appending to the record file ``path`` (one worker's job)."""
    with RecordWriter(path) if path is not None else nullcontext() as writer:
        return run_toy_lq_one(variant, seed, steps, writer, w_std, overrides)


def run_toy_lq(rules: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2),
               steps: int = 8000, writer: RecordWriter | None = None, progress: bool = True,
               w_std: float = DEFAULT_W_STD, workers: int | None = 1,
               overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every variant (default: dfa, state_bridge, credit_bridge, credit_bridge_tgw0) x seed on
    ``workers`` processes (None: the cores available), each appending its records (one line per
    write) to ``writer``'s file; ``overrides`` (rule hyper-parameters) go to every variant whose
    rule takes them. Names, ``w_std`` and overrides are checked before anything runs."""
    variants = list(rules or DEFAULT_VARIANTS)
    for v in variants:
        TOY_VARIANTS.get(v)
    make_toy_lq(0, w_std=w_std)  # validates w_std
    check_overrides(variants, overrides)
    path = None if writer is None else str(writer.path)
    if writer is not None and writer.identity:
        raise ValueError("run_toy_lq writes its own identity fields; pass a plain RecordWriter")
    calls = [(_run_into, (path, v, s, steps, w_std, overrides)) for v in variants for s in seeds]
    return run_calls(calls, workers, progress, desc="toy-lq")
