"""The stress suite: every stress problem x optimizer configuration x seed
(docs/algorithms.md#tasks), with the knobs of the original project's stress script
(:class:`StressOptions`: problem sizes, noise scale, sparsity, learning rates, timing warm-up).

Chimera21's collision score needs its diagnostics, which cost time; they are switched on every
``diag_every``-th step only (default ``DIAG_EVERY``), and those steps are left out of the
step-time median (unless every step is one). Each such step writes a step record with the
optimizer's diagnostics (``opt_<name>``, as training runs record them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from chimera._validate import integer, number, require
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


@dataclass(frozen=True)
class StressOptions:
    """The stress problems' sizes and noise, the learning rates and the timing of a stress run
    (the original script's ``--batch-size``, ``--in-features``, ``--hidden-features``,
    ``--noise-scale``, ``--sparsity``, ``--lr``, ``--timing-warmup-steps``).

    ``lr``: None keeps each configuration's own; a number replaces it for every problem; a
    table ``{problem: lr}`` replaces it for the problems it names. ``diag_every``: steps between
    optimizer diagnostics and step records (1: every step, as the original logged them).
    """

    batch_size: int = 64
    in_features: int = 32
    hidden_features: int = 64
    noise_scale: float = 1.0
    sparsity: float = 0.5
    lr: float | dict[str, float] | None = field(default=None, hash=False)
    timing_warmup_steps: int = WARMUP_STEPS
    diag_every: int = DIAG_EVERY

    def __post_init__(self) -> None:
        for name in ("batch_size", "in_features", "hidden_features", "diag_every"):
            integer(name, getattr(self, name), 1)
        integer("timing_warmup_steps", self.timing_warmup_steps, 0)
        number("noise_scale", self.noise_scale, 0)
        number("sparsity", self.sparsity, 0, 1, high_open=True)
        if isinstance(self.lr, dict):
            for problem, lr in self.lr.items():
                require(problem in STRESS.names(), "lr problem", problem,
                        f"a stress problem ({', '.join(STRESS.names())})")
                number(f"lr.{problem}", lr, 0, low_open=True)
        elif self.lr is not None:
            number("lr", self.lr, 0, low_open=True)

    def problem_args(self) -> dict[str, Any]:
        """The keyword arguments of :func:`make_stress_problem`."""
        return {"batch": self.batch_size, "n_in": self.in_features, "hidden": self.hidden_features,
                "noise_scale": self.noise_scale, "sparsity": self.sparsity}

    def lr_for(self, problem: str) -> float | None:
        """The learning rate that replaces the configuration's on ``problem`` (None: none)."""
        return self.lr.get(problem) if isinstance(self.lr, dict) else self.lr

    def config_suffix(self) -> str:
        """``""`` when the problems and learning rates are the defaults, else ``-<hash>`` of the
        options that change the losses (the timing and diagnostics options do not)."""
        changed = {k: v for k, v in dataclasses.asdict(self).items()
                   if k not in ("timing_warmup_steps", "diag_every")
                   and v != getattr(DEFAULT_OPTIONS, k)}
        if not changed:
            return ""
        return "-" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]


DEFAULT_OPTIONS = StressOptions()


def stress_config_id(problem: str, config: str, options: StressOptions = DEFAULT_OPTIONS) -> str:
    """The configuration id of a stress run (its seeds share it)."""
    return f"{problem}-{config}{options.config_suffix()}"


def run_stress_one(
    problem: str, config: str, seed: int, steps: int, writer: RecordWriter | None = None,
    options: StressOptions = DEFAULT_OPTIONS,
) -> dict[str, Any]:
    """Train one configuration on one stress problem; returns (and writes) the final record."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    opt_name, hparams = STRESS_CONFIGS.get(config)()
    if options.lr_for(problem) is not None:
        hparams["lr"] = options.lr_for(problem)
    prob = make_stress_problem(problem, seed=seed, **options.problem_args())
    opt = build_optimizer(opt_name, prob.model, **hparams)
    has_diag = opt_name == "chimera21"
    config_id = stress_config_id(problem, config, options)
    identity = {"run_id": f"stress-{config_id}-s{seed}", "config_id": config_id,
                "task": f"stress/{problem}", "problem": problem, "config": config,
                "optimizer": opt_name, "optimizer_hparams": hparams, "seed": seed,
                "stress_options": dataclasses.asdict(options)}
    log = writer.with_identity(**identity) if writer is not None else None
    losses, times, collisions = [], [], []
    for step in range(1, steps + 1):
        record_step = step % options.diag_every == 0
        diag_step = has_diag and record_step
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
            collisions.append(opt.last_diagnostics.get("collision_score", float("nan")))
        if step > options.timing_warmup_steps and (not diag_step or options.diag_every == 1):
            times.append(elapsed)
        if log is not None and record_step:
            diag = opt.last_diagnostics if diag_step else {}
            log.write("step", step=step, loss=losses[-1], step_time_s=elapsed,
                      **{f"opt_{k}": v for k, v in diag.items()})
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
    options: StressOptions = DEFAULT_OPTIONS,
) -> list[dict[str, Any]]:
    """Run the grid problems x configs x seeds with ``options``; names are checked before
    anything runs."""
    problems = list(problems or STRESS.names())
    configs = list(configs or STRESS_CONFIGS.names())
    for p in problems:
        STRESS.get(p)
    for c in configs:
        STRESS_CONFIGS.get(c)
    grid = [(p, c, s) for p in problems for c in configs for s in seeds]
    return [
        run_stress_one(p, c, s, steps, writer, options)
        for p, c, s in tqdm(grid, desc="stress", disable=not progress, leave=False)
    ]
