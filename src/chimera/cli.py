"""The ``chimera`` command: train, compare-quant, export, stress, toy-lq, bench, sweep, tune,
report, perf, list.

A user error ends a command with one line ``chimera: error: ...`` and exit code 2, found before
anything runs wherever it can be: bad options and values (``KEY=VALUE`` values are parsed
strictly and checked by the run spec, the model's signature and a probe build), duplicate or
empty lists, ``--checkpoint`` placeholders, output paths that cannot be written, overrides with
nothing to set. Any other exception is an internal error: its traceback, then one line asking to
report it, and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
import tomllib
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from chimera._validate import fail, integer, number, require

# non-finite numbers, which standard JSON has no words for: floats (the spec rejects them)
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
               "infinity": math.inf, "+infinity": math.inf, "-infinity": -math.inf}
_BARE_WORD = re.compile(r"[A-Za-z_][\w.:/+-]*")
_VALUE = "a JSON value (0.1, true, null, \"text\", [...], {...}) or a bare word"


def parse_value(raw: str, what: str) -> Any:
    """One ``KEY=VALUE`` value: JSON (a list as a tuple), ``nan`` / ``inf`` / ``-inf`` /
    ``Infinity`` as floats, a bare word (``first``, ``features.0``) as a string; anything else
    (``[0.9,``, ``1e-3x``, an empty value) is a ``ValueError`` naming ``what``."""
    if raw.lower() in _NON_FINITE:
        return _NON_FINITE[raw.lower()]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        require(bool(_BARE_WORD.fullmatch(raw)), what, raw, _VALUE)
        return raw
    return tuple(value) if isinstance(value, list) else value


def parse_kv(items: Sequence[str], what: str) -> dict[str, Any]:
    """``["lr=0.1", "betas=[0.9,0.99]"]`` -> ``{"lr": 0.1, "betas": (0.9, 0.99)}`` (values as
    :func:`parse_value`); a key given twice is an error."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like KEY=VALUE, got {item!r}")
        require(key not in out, f"{what} {key}", item, "given once")
        out[key] = parse_value(raw, f"{what} {key}")
    return out


def _names(flag: str, text: str, *, required: bool = False) -> list[str] | None:
    """A comma-separated list of distinct names; ``""`` is None (the command's default), or an
    error when ``required``."""
    if not text and not required:
        return None
    names = [n.strip() for n in text.split(",")]
    require(all(names), flag, text, "comma-separated names, none empty")
    require(len(set(names)) == len(names), flag, text, "distinct names")
    return names


def _seed_range(n: int) -> range:
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    return range(n)


def _workers(value: int | None) -> int | None:
    return None if value is None else integer("--workers", value, 1)


def execution_from_args(args: argparse.Namespace) -> Any:
    """The :func:`chimera.bench.workers.execution` that the options of ``EXECUTION_OPTIONS``
    (and ``--workers``) ask for: the context to run a harness command's jobs in."""
    from chimera.bench.workers import execution
    from chimera.run.records import summary_writer_class

    if args.log:  # a missing extra is one line before anything runs
        summary_writer_class()
    executor = None
    if args.executor == "ray":
        from chimera.bench.ray_executor import RayExecutor, import_ray

        import_ray()  # a missing extra is one line before anything runs
        executor = RayExecutor(args.address, _workers(args.workers), args.cpus_per_run,
                               args.gpus_per_run)
    else:
        for flag in ("address", "cpus_per_run", "gpus_per_run"):
            require(getattr(args, flag) is None, "--" + flag.replace("_", "-"),
                    getattr(args, flag), "given only with --executor ray")
    return execution(executor, log=args.log)


# --- output paths ------------------------------------------------------------------------------

def _check_ancestors(flag: str, path: Path) -> None:
    """The nearest existing folder above ``path`` is a writable folder (the rest is created)."""
    for parent in path.absolute().parents:
        if parent.exists():
            require(parent.is_dir(), flag, str(path), f"a path under folders ({parent} is a file)")
            require(os.access(parent, os.W_OK | os.X_OK), flag, str(path),
                    f"a path in a writable folder ({parent} is not writable)")
            return


def check_output_file(flag: str, path: str | os.PathLike) -> None:
    """``path`` can be written as a file: not a folder, not under a file, in a writable folder;
    otherwise a ``ValueError`` line naming ``flag``."""
    p = Path(path)
    require(not p.is_dir(), flag, str(path), "a file path (it is a folder)")
    _check_ancestors(flag, p)
    if p.exists():
        require(os.access(p, os.W_OK), flag, str(path), "a writable file")


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def check_output_dir(flag: str, path: str | os.PathLike) -> None:
    """``path`` can be used as an output folder: an existing writable folder, or one that can be
    created; otherwise a ``ValueError`` line naming ``flag``."""
    p = Path(path)
    if p.exists():
        require(p.is_dir(), flag, str(path), "a folder path (it is a file)")
        require(os.access(p, os.W_OK | os.X_OK), flag, str(path), "a writable folder")
    else:
        _check_ancestors(flag, p)


# --- train -------------------------------------------------------------------------------------

def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`~chimera.run.spec.RunSpec` field, with the field's default and
    help: hyper-parameter tables as repeatable ``KEY=VALUE`` options, ``--seed`` as a list."""
    from chimera.run.spec import RunSpec

    for f in dataclasses.fields(RunSpec):
        help = f.metadata["help"]
        if f.metadata["flag"]:  # a table of hyper-parameters
            parser.add_argument(f.metadata["flag"], dest=f.name, action="append", default=[],
                                metavar="KEY=VALUE", help=help)
        elif f.name == "seed":
            parser.add_argument("--seed", type=int, nargs="+", default=[f.default], help=help)
        elif f.default is None:  # an optional count: a positive integer or "none"
            parser.add_argument("--" + f.name.replace("_", "-"), type=_optional_int,
                                default=None, metavar="N", help=f"{help} (default: none)")
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                                default=f.default, help=f"{help} (default: {f.default})")
    parser.add_argument("--no-controller", action="store_true",
                        help="no target-bits controller, not even quantizer chimera's default")


def _optional_int(text: str) -> int | None:
    """An optional count option: ``none`` or an integer (its range is the run spec's check)."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def spec_from_args(args: argparse.Namespace, seed: int) -> Any:
    """The run spec of ``seed`` from the options of :func:`add_spec_options` (``--lr`` goes into
    the optimizer's hyper-parameters; no ``--controller-arg`` means the quantizer's default
    controller, ``--no-controller`` none)."""
    from chimera.run.spec import RunSpec

    values = {}
    for f in dataclasses.fields(RunSpec):
        value = getattr(args, f.name)
        values[f.name] = parse_kv(value, f.metadata["flag"]) if f.metadata["flag"] else value
    if args.lr is not None:
        if "lr" in values["optimizer_hparams"]:
            raise ValueError("--lr and --opt-arg lr both set the learning rate; give one")
        values["optimizer_hparams"]["lr"] = args.lr
    if args.no_controller:
        if values["controller"]:
            raise ValueError("--no-controller and --controller-arg contradict each other; give one")
        values["controller"] = False
    else:
        values["controller"] = values["controller"] or None
    return RunSpec(**{**values, "seed": seed})


def _train_specs(args: argparse.Namespace) -> list[Any]:
    """One spec per distinct ``--seed``, the model arguments checked against its signature."""
    from chimera.bench.suite.schema import check_model_hparams

    require(len(set(args.seed)) == len(args.seed), "--seed", args.seed, "distinct seeds")
    specs = [spec_from_args(args, seed) for seed in args.seed]
    check_model_hparams(specs[0].model, specs[0].model_hparams)
    return specs


def checkpoint_paths(template: str | None, specs: Sequence[Any]) -> list[str | None]:
    """The ``--checkpoint`` path of every spec: ``{run_id}`` and ``{seed}`` filled in, one file
    per run (several seeds need a placeholder); every other placeholder is an error."""
    if template is None:
        return [None] * len(specs)
    try:
        paths = [template.format(run_id=s.run_id, seed=s.seed) for s in specs]
    except (KeyError, IndexError, AttributeError, TypeError, ValueError):
        fail("--checkpoint", template, "a path whose only placeholders are {run_id} and {seed}")
    require(len(set(paths)) == len(paths), "--checkpoint", template,
            "a path with {run_id} or {seed} when several seeds train (one file per run)")
    return paths


def _cmd_train(args: argparse.Namespace) -> None:
    from chimera.bench.report.tables import runs_table
    from chimera.data import load_task
    from chimera.run.build import probe_run
    from chimera.run.records import LOG_SINKS, RecordWriter
    from chimera.run.trainer import train

    if args.data_dir is not None:  # where cifar10 looks (the same as setting CHIMERA_DATA)
        require(args.task == "cifar10", "--data-dir", args.data_dir,
                f"given only with --task cifar10 (task {args.task!r} reads no data folder)")
        os.environ["CHIMERA_DATA"] = args.data_dir
    specs = _train_specs(args)
    checkpoints = checkpoint_paths(args.checkpoint, specs)
    check_output_file("--out", args.out)
    for path in checkpoints:
        if path is not None:
            check_output_file("--checkpoint", path)
            require(not _same_file(path, args.out), "--checkpoint", path,
                    "another path than --out (the records)")
    data = load_task(specs[0].task)
    probe_run(specs[0], data)  # the seeds share everything the probe builds
    finals = []
    sinks = [LOG_SINKS[name](Path(args.out).parent / name) for name in args.log]
    with RecordWriter(args.out, sinks=sinks) as writer:
        for spec, checkpoint in zip(specs, checkpoints, strict=True):
            finals.append({**spec.to_dict(), **train(spec, writer, data=data,
                                                     progress=not args.quiet,
                                                     checkpoint=checkpoint)})
    print(runs_table(finals))
    print(f"records: {args.out}")


def _probe_all(specs: Sequence[Any]) -> None:
    """:func:`~chimera.run.build.probe_run` once per configuration of ``specs``."""
    from chimera.data import load_task
    from chimera.run.build import probe_run

    data: dict[str, Any] = {}
    probed = set()
    for spec in specs:
        if spec.config_id not in probed:
            if spec.task not in data:
                data[spec.task] = load_task(spec.task)
            probe_run(spec, data[spec.task])
            probed.add(spec.config_id)


def _cmd_compare_quant(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.compare_quant import quant_specs, run_compare_quant
    from chimera.bench.report.tables import quant_table
    from chimera.run.records import RecordWriter

    quantizers = _names("--quantizers", args.quantizers, required=True)
    specs = quant_specs(quantizers, _seed_range(args.seeds), task=args.task,
                        model=args.model, epochs=args.epochs)
    check_output_file("--out", args.out)
    _probe_all(specs)
    with RecordWriter(args.out) as writer:
        finals = run_compare_quant(specs, writer, progress=not args.quiet)
    print(quant_table(finals))
    print(f"records: {args.out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from chimera.run.export_run import export_checkpoint

    check_output_file("out", args.out)
    require(not _same_file(args.out, args.checkpoint), "out", args.out,
            "another path than the checkpoint")
    require(not Path(args.out).exists() or Path(args.out).suffix == ".safetensors", "out",
            args.out, "a new file or an existing .safetensors file (it would be overwritten)")
    report = export_checkpoint(args.checkpoint, args.out, format=args.format)
    for key, value in report.items():
        print(f"{key}: {value}")


def stress_lr(items: Sequence[str]) -> float | dict[str, float] | None:
    """``--lr`` of ``chimera stress``: nothing (each configuration's own), one number (every
    problem), or ``PROBLEM=LR`` items (those problems)."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return parse_value(items[0], "--lr")
    return parse_kv(items, "--lr")


def _cmd_stress(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.stress import STRESS_CONFIGS, StressOptions, run_stress
    from chimera.bench.report.tables import stress_table
    from chimera.data.stress_problems import STRESS
    from chimera.run.records import RecordWriter

    problems = _names("--problems", args.problems)
    configs = _names("--optimizers", args.optimizers)
    for registry, names in ((STRESS, problems), (STRESS_CONFIGS, configs)):
        for name in names or ():
            registry.get(name)
    seeds, steps = _seed_range(args.seeds), integer("--steps", args.steps, 1)
    given = {name: getattr(args, name) for name, _, _ in _STRESS_OPTIONS
             if getattr(args, name) is not None}
    options = StressOptions(**given, lr=stress_lr(args.lr))
    check_output_file("--out", args.out)
    with RecordWriter(args.out) as writer:
        finals = run_stress(problems, configs, seeds=seeds, steps=steps, writer=writer,
                            progress=not args.quiet, options=options)
    print(stress_table(finals))
    print(f"records: {args.out}")


BENCH_OVERRIDES = ("stress_steps", "toy_lq_steps", "quant_epochs", "rule_epochs", "epochs")


def _suite_places(data: Any) -> dict[str, tuple[str, bool]] | None:
    """For every ``chimera bench`` override: what it sets in a suite and whether the parsed
    suite ``data`` has it (as :func:`chimera.bench.jobs.bench.override_suite` applies them);
    None for data of a shape that :func:`~chimera.bench.suite.schema.load_suite` rejects."""
    from chimera.bench.jobs.bench import QUANT_GRID, RULE_GRID

    grids = data.get("grid", [data] if "task" in data or "tasks" in data else []) \
        if isinstance(data, dict) else None
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        return None
    names = [g.get("name") for g in grids]
    return {
        "stress_steps": ("[stress] section", "stress" in data),
        "toy_lq_steps": ("[toy_lq] section", "toy_lq" in data),
        "quant_epochs": (f"grid named '{QUANT_GRID}'", QUANT_GRID in names),
        "rule_epochs": (f"grid named '{RULE_GRID}'", RULE_GRID in names),
        "epochs": (f"grid other than those named '{QUANT_GRID}' and '{RULE_GRID}'",
                   any(n not in (QUANT_GRID, RULE_GRID) for n in names)),
    }


def _check_bench_overrides(args: argparse.Namespace) -> None:
    """Every override given is a positive integer and has something to set in the suite (an
    override the suite has no place for would be ignored silently)."""
    from chimera.bench.jobs.bench import bench_suite

    given = [k for k in BENCH_OVERRIDES if getattr(args, k) is not None]
    for key in given:
        integer("--" + key.replace("_", "-"), getattr(args, key), 1)
    if args.suite is None:
        data, where = bench_suite(), "the bench suite"
    else:
        try:
            data = tomllib.loads(Path(args.suite).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return  # load_suite reports it
        where = f"suite {args.suite}"
    places = _suite_places(data)
    for key in given if places is not None else ():
        place, present = places[key]
        if not present:
            raise ValueError(f"--{key.replace('_', '-')} has nothing to set: {where} has no "
                             f"{place}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.bench import run_bench

    seeds = None if args.seeds is None else _seed_range(args.seeds)
    workers = _workers(args.workers)
    _check_bench_overrides(args)
    check_output_dir("--out", args.out)
    start = time.perf_counter()
    with execution_from_args(args):
        summary = run_bench(args.out, seeds=seeds, stress_steps=args.stress_steps,
                            epochs=args.epochs, quant_epochs=args.quant_epochs,
                            rule_epochs=args.rule_epochs, toy_lq_steps=args.toy_lq_steps,
                            workers=workers, progress=not args.quiet, suite=args.suite,
                            wait=args.wait)
    print(summary)
    print(f"records, summary.md, report.csv and plots in {args.out}/ "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"report: {os.path.join(args.out, 'report.md')}")


def _suite_command(args: argparse.Namespace, run: Any, written: str) -> None:
    """``run(suite, out, ...)`` (a sweep or a tune) with the command's options; prints its
    summary and the files ``written`` into ``--out``."""
    workers = _workers(args.workers)
    check_output_dir("--out", args.out)
    with execution_from_args(args):
        summary = run(args.suite, args.out, workers=workers, progress=not args.quiet,
                      wait=args.wait)
    print(summary)
    print(f"{written} in {args.out}/")


def _cmd_sweep(args: argparse.Namespace) -> None:
    from chimera.bench.suite.execute import run_sweep

    _suite_command(args, run_sweep, "records, checkpoints/ and summary.md")


def _cmd_tune(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.tune import run_tune

    _suite_command(args, run_tune, "tuned.toml, tune/, final/, summary.md and report.md")


def _cmd_report(args: argparse.Namespace) -> None:
    from chimera.bench.report.profiles import TIME_TO_TARGET_HEADING
    from chimera.bench.report.targets import parse_target_options
    from chimera.bench.report.write import write_report

    if args.out is not None:
        check_output_dir("--out", args.out)
    paths = write_report(args.directory, args.out, targets=parse_target_options(args.target))
    text = paths.markdown.read_text(encoding="utf-8")
    start = text.find(TIME_TO_TARGET_HEADING)  # the time to target and performance profiles
    if start >= 0:
        end = text.find("\n## ", start + 1)
        print(text[start:end if end >= 0 else None].rstrip() + "\n")
    print(paths.markdown, paths.csv, *paths.plots, sep="\n")


def _cmd_toy_lq(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.toy_lq import (
        DEFAULT_VARIANTS,
        DEFAULT_W_STD,
        TOY_VARIANTS,
        check_overrides,
        run_toy_lq,
    )
    from chimera.bench.report.tables import toy_lq_table
    from chimera.run.records import RecordWriter

    rules = _names("--rules", args.rules)
    for name in rules or ():
        TOY_VARIANTS.get(name)
    seeds, steps = _seed_range(args.seeds), integer("--steps", args.steps, 1)
    w_std = DEFAULT_W_STD if args.w_std is None else number("--w-std", args.w_std, 0)
    workers = _workers(args.workers)
    overrides = parse_kv(args.rule_arg, "--rule-arg")
    check_overrides(rules or DEFAULT_VARIANTS, overrides)
    check_output_file("--out", args.out)
    start = time.perf_counter()
    with RecordWriter(args.out) as writer:
        finals = run_toy_lq(rules, seeds=seeds, steps=steps, writer=writer,
                            progress=not args.quiet, w_std=w_std, workers=workers,
                            overrides=overrides)
    print(toy_lq_table(finals))
    print(f"records: {args.out} ({time.perf_counter() - start:.0f} s)")


def _cmd_perf(args: argparse.Namespace) -> None:
    from chimera.bench.perf import PERF_TARGETS

    PERF_TARGETS.get(args.target).run(args)


def _cmd_list(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.stress import STRESS_CONFIGS
    from chimera.data import TASKS
    from chimera.data.stress_problems import STRESS
    from chimera.models import MODELS
    from chimera.nn.quantize import QUANTIZERS
    from chimera.optim import OPTIMIZERS
    from chimera.rules import RULES

    for reg in (OPTIMIZERS, QUANTIZERS, RULES, TASKS, MODELS, STRESS, STRESS_CONFIGS):
        print(f"{reg.kind}s: {', '.join(reg.names())}")


def _add_train(parser: argparse.ArgumentParser) -> None:
    add_spec_options(parser)
    parser.add_argument("--lr", type=float, default=None, help="the optimizer's lr (an --opt-arg)")
    parser.add_argument("--data-dir", default=None,
                        help="local data folder for cifar10 (default: $CHIMERA_DATA)")
    parser.add_argument("--checkpoint", default=None,
                        help="save the trained run here (may contain {run_id} and {seed})")
    parser.add_argument("--out", default="runs.jsonl", help="JSONL record file (appended)")
    parser.add_argument(*_LOG[0], **_LOG[1])


def _add_perf_targets(parser: argparse.ArgumentParser) -> None:
    from chimera.bench.perf import PERF_TARGETS

    targets = parser.add_subparsers(dest="target", required=True)
    for name in PERF_TARGETS.names():
        target = PERF_TARGETS.get(name)
        target.add_arguments(targets.add_parser(name, help=target.help))


def _o(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One option: ``add_argument``'s arguments."""
    return flags, kwargs


_SEEDS = "number of seeds (0..N-1)"
# chimera stress's problem and timing options (unset: StressOptions' defaults, docs/suites.md)
_STRESS_OPTIONS = (
    ("batch_size", int, "examples per step"), ("in_features", int, "inputs of the model"),
    ("hidden_features", int, "hidden units of the model"),
    ("noise_scale", float, "scale of the target / gradient noise"),
    ("sparsity", float, "share of zeroed inputs of sparse_relu, in [0, 1)"),
    ("timing_warmup_steps", int, "first steps left out of the step-time median"),
    ("diag_every", int, "steps between optimizer diagnostics and step records (1: every step)"),
)
_OUT = "JSONL record file (appended)"
_WORKERS = "processes, one job each (default: the cores available)"
_LOG = _o("--log", action="append", default=[], choices=["tensorboard"],
          help="also mirror the records to TensorBoard: event files in tensorboard/<run_id>/ "
               "in the folder of the run's records; needs the tracking extra")
# how a harness command's jobs run (execution_from_args); sweep, bench and tune take them
EXECUTION_OPTIONS = [
    _o("--executor", default="local", choices=["local", "ray"],
       help="local: this machine's process pool; ray: one Ray task per run (docs/cluster.md)"),
    _o("--address", default=None, help="the Ray cluster to join (auto: the one `ray start` "
                                        "began here; default: a local instance of --workers CPUs)"),
    _o("--cpus-per-run", type=float, default=None,
       help="CPUs of each Ray task (default: the suite's [resources] num_cpus, else 1)"),
    _o("--gpus-per-run", type=float, default=None,
       help="GPUs of each Ray task (default: the suite's [resources] num_gpus, else 0)"),
    _LOG,
]
_WAIT = _o("--wait", action="store_true", help="if another command is writing into --out, wait "
           "for it to finish (default: refuse with the holder's pid and command)")
# name -> (handler, help, options or a function adding them, takes --quiet)
COMMANDS: dict[str, tuple[Any, str, Any, bool]] = {
    "train": (_cmd_train, "train one configuration over one or more seeds", _add_train, True),
    "compare-quant": (_cmd_compare_quant, "the same task and budget with each quantizer", [
        _o("--task", default=None, help="default: the bench recipe's (mnist1d)"),
        _o("--model", default=None, help="default: the bench recipe's (cnn)"),
        _o("--quantizers", default="fp32,strict_bitnet,chimera,int_ternary"),
        _o("--seeds", type=int, default=3, help=_SEEDS),
        _o("--epochs", type=int, default=None, help="default: the bench recipe's (100)"),
        _o("--out", default="compare-quant.jsonl", help=_OUT),
    ], True),
    "export": (_cmd_export, "pack a trained ternary run into one safetensors file", [
        _o("checkpoint", help="a checkpoint written by `chimera train --checkpoint`"),
        _o("out", help="the .safetensors file to write"),
        _o("--format", default="base3", choices=["base3", "2bit"],
           help="base3: 5 weights per byte (1.6 bits); 2bit: 4 per byte"),
    ], False),
    "stress": (_cmd_stress, "stress problems x optimizer configurations x seeds", [
        _o("--problems", default="", help="comma-separated (default: all)"),
        _o("--optimizers", default="",
           help="comma-separated configurations (default: all; see `chimera list`)"),
        _o("--seeds", type=int, default=3, help=_SEEDS), _o("--steps", type=int, default=300),
        *(_o(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)
          for name, kind, text in _STRESS_OPTIONS),
        _o("--lr", action="append", default=[], metavar="LR | PROBLEM=LR",
           help="learning rate of every configuration: one number for every problem, or "
                "PROBLEM=LR (repeatable) per problem (default: each configuration's own)"),
        _o("--out", default="stress.jsonl", help=_OUT),
    ], True),
    "bench": (_cmd_bench, "the main job on embedded data", [
        _o("--out", default="bench-out"),
        _o("--suite", default=None,
           help="run this suite file instead of the packaged bench suite (docs/suites.md)"),
        *(_o(flag, type=int, default=None, help=help) for flag, help in (
            ("--seeds", "number of seeds (0..N-1) of every section (default: the suite's, 3)"),
            ("--stress-steps", "steps of the stress section (default: the suite's, 300)"),
            ("--toy-lq-steps", "steps of the toy LQ section (default: the suite's, 300)"),
            ("--epochs", "epochs of every grid but 'quant' and 'rules' (default: the suite's: "
                         "digits 20, MNIST-1D optimizers 50)"),
            ("--quant-epochs", "epochs of the grids named 'quant' (default: the suite's 100)"),
            ("--rule-epochs", "epochs of the grids named 'rules' (default: the suite's 10)"),
            ("--workers", _WORKERS))),
        _WAIT, *EXECUTION_OPTIONS,
    ], True),
    "sweep": (_cmd_sweep, "run (or finish) a TOML suite of runs; resumable", [
        _o("suite", help="the suite file (docs/suites.md)"),
        _o("--out", required=True, help="output folder: <run_id>.jsonl, checkpoints/"),
        _o("--workers", type=int, default=None, help=_WORKERS),
        _WAIT, *EXECUTION_OPTIONS,
    ], True),
    "tune": (_cmd_tune, "tune a suite's [tune] hyper-parameters on validation (tuning seeds), "
             "then run the chosen values on the reporting seeds; resumable", [
        _o("suite", help="a suite file with a [tune] table (docs/suites.md)"),
        _o("--out", required=True,
           help="output folder: tune/, tuned.toml, final/, summary.md, report.md"),
        _o("--workers", type=int, default=None, help=_WORKERS),
        _WAIT, *EXECUTION_OPTIONS,
    ], True),
    "toy-lq": (_cmd_toy_lq, "credit quality of each learning rule on the toy LQ problem", [
        _o("--rules", default="", help="comma-separated variants (default: dfa, state_bridge, "
                                       "credit_bridge, credit_bridge_tgw0)"),
        _o("--seeds", type=int, default=3, help=_SEEDS), _o("--steps", type=int, default=8000),
        _o("--w-std", type=float, default=None,
           help="scale of the residual weights W_l (entries N(0, w_std^2/d)); default 0.3 (at "
                "the library's 0.03 the costates barely change with depth)"),
        _o("--rule-arg", action="append", default=[], metavar="KEY=VALUE",
           help="rule hyper-parameter over the toy preset, e.g. fm_weight=1.0, lam=0.05, given "
                "to every variant whose rule takes it (repeatable)"),
        _o("--workers", type=int, default=None, help=_WORKERS),
        _o("--out", default="toy-lq.jsonl", help=_OUT),
    ], True),
    "report": (_cmd_report, "report.md, report.csv and PNG plots from records only", [
        _o("directory", help="a folder of *.jsonl records (searched recursively)"),
        _o("--out", default=None, help="output folder (default: the records folder)"),
        _o("--target", action="append", default=[], metavar="TASK=ACC",
           help="validation accuracy target for the time to target (repeatable; TASK or "
                "TASK/MODEL; overrides the defaults and the folder's targets.toml)"),
    ], False),
    "perf": (_cmd_perf, "ours vs the PyTorch baseline: optim | layers | rules",
             _add_perf_targets, False),
    "list": (_cmd_list, "list registered optimizers, tasks, models, problems", [], False),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ``ValueError`` lines (see :func:`main`), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``chimera`` command (one sub-command per ``COMMANDS`` entry)."""
    p = _Parser(prog="chimera", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (handler, help, options, quiet) in COMMANDS.items():
        sp = sub.add_parser(name, help=help)
        if callable(options):
            options(sp)
        for flags, kwargs in options if not callable(options) else ():
            sp.add_argument(*flags, **kwargs)
        if quiet:
            sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.set_defaults(func=handler)
    return p


def _user_error(message: str) -> int:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    print(f"chimera: error: {'; '.join(lines) or 'invalid input'}", file=sys.stderr)
    return 2


def _internal_error() -> int:
    traceback.print_exc()
    print("chimera: internal error: this is a bug in chimera; please report it with the command "
          "line and the traceback above", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when the command succeeds; a user error (a bad option or value, a path
    that cannot be read or written) prints one line ``chimera: error: ...`` and returns 2; a
    closed stdout (``| head``) ends quietly with 0; any other exception prints its traceback
    and a line asking to report it, and returns 1."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except ValueError as e:
        return _user_error(str(e))
    except BrokenPipeError:  # the reader of stdout left (`chimera report DIR | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except OSError as e:  # on a path of the user's (one the checks could not foresee)
        if e.filename is None:
            return _internal_error()
        return _user_error(f"{e.strerror or e}: {e.filename}")
    except Exception:
        return _internal_error()
    return 0


if __name__ == "__main__":
    sys.exit(main())
