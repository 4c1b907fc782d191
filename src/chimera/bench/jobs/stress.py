"""The stress suite: every stress problem x optimizer configuration x seed
(docs/algorithms.md#tasks).

Chimera21's collision score needs its diagnostics, which cost time; they are switched on every
``DIAG_EVERY``-th step only, and those steps are left out of the step-time median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from chimera.data.stress_problems import STRESS, make_stress_problem
from chimera.optim import build_optimizer, optimizer_state_memory_summary
from chimera.registry import Registry
from chimera.run.records import RecordWriter

DIAG_EVERY = 10
WARMUP_STEPS = 10
FINAL_WINDOW = 20  # the final loss is the mean of the last FINAL_WINDOW step losses

STRESS_CONFIGS: Registry[tuple[str, dict[str, Any]]] = Registry("stress configuration")
_ADAPTIVE_LR = 3e-3
_SIGN_LR = 1e-3
for _name, _opt, _hp in [
    ("sgd", "sgd", {"lr": 1e-2, "momentum": 0.9}),
    ("adam", "adam", {"lr": _ADAPTIVE_LR}),
    ("adamw", "adamw", {"lr": _ADAPTIVE_LR}),
    ("lion", "lion", {"lr": _SIGN_LR}),
    ("stac", "stac", {"lr": _SIGN_LR}),
    ("chimera21", "chimera21", {"lr": _ADAPTIVE_LR}),
    ("chimera21-crossgate", "chimera21", {"lr": _ADAPTIVE_LR, "kappa_gate_mode": "noise_ratio"}),
    ("chimera21-zero-freeze", "chimera21", {"lr": _ADAPTIVE_LR, "zero_grad_policy": "freeze"}),
    ("chimera21-zero-decay", "chimera21", {"lr": _ADAPTIVE_LR, "zero_grad_policy": "decay"}),
    ("chimera21-zero-inertia", "chimera21", {"lr": _ADAPTIVE_LR, "zero_grad_policy": "inertia"}),
    ("chimera21-psi-int8", "chimera21", {"lr": _ADAPTIVE_LR, "psi_storage": "int8"}),
]:
    STRESS_CONFIGS.register(_name)(lambda o=_opt, h=_hp: (o, dict(h)))


def run_stress_one(
    problem: str, config: str, seed: int, steps: int, writer: RecordWriter | None = None
) -> dict[str, Any]:
    """Train one configuration on one stress problem; returns (and writes) the final record."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    opt_name, hparams = STRESS_CONFIGS.get(config)()
    prob = make_stress_problem(problem, seed=seed)
    opt = build_optimizer(opt_name, prob.model, **hparams)
    has_diag = opt_name == "chimera21"
    identity = {"run_id": f"stress-{problem}-{config}-s{seed}", "config_id": f"{problem}-{config}",
                "task": f"stress/{problem}", "problem": problem, "config": config,
                "optimizer": opt_name, "optimizer_hparams": hparams, "seed": seed}
    log = writer.with_identity(**identity) if writer is not None else None
    losses, times, collisions = [], [], []
    for step in range(1, steps + 1):
        diag_step = has_diag and step % DIAG_EVERY == 0
        if has_diag:
            for group in opt.param_groups:
                group["log_diagnostics"] = diag_step
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = prob.loss(step)
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - t0
        losses.append(loss.item())
        if diag_step:
            collisions.append(opt.last_diagnostics["collision_score"])
        elif step > WARMUP_STEPS:
            times.append(elapsed)
        if log is not None and step % DIAG_EVERY == 0:
            log.write("step", step=step, loss=losses[-1], step_time_s=elapsed)
    final = {
        **identity,
        "steps": steps,
        "final_loss": statistics.fmean(losses[-FINAL_WINDOW:]),
        "median_step_time_s": statistics.median(times) if times else None,
        "optimizer_state_bytes": optimizer_state_memory_summary(opt)["total"],
        "collision_score": statistics.fmean(collisions) if collisions else None,
    }
    if log is not None:
        log.write("final", **{k: v for k, v in final.items() if k not in identity})
    return final


def run_stress(
    problems: Sequence[str] | None = None,
    configs: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    writer: RecordWriter | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the grid problems x configs x seeds; names are checked before anything runs."""
    problems = list(problems or STRESS.names())
    configs = list(configs or STRESS_CONFIGS.names())
    for p in problems:
        STRESS.get(p)
    for c in configs:
        STRESS_CONFIGS.get(c)
    grid = [(p, c, s) for p in problems for c in configs for s in seeds]
    return [
        run_stress_one(p, c, s, steps, writer)
        for p, c, s in tqdm(grid, desc="stress", disable=not progress, leave=False)
    ]
