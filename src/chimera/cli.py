"""The ``chimera`` command: train, compare-quant, export, stress, toy-lq, bench, sweep, report,
perf, list."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any


def parse_kv(items: Sequence[str], what: str) -> dict[str, Any]:
    """``["lr=0.1", "betas=[0.9,0.99]"]`` -> ``{"lr": 0.1, "betas": (0.9, 0.99)}`` (JSON values,
    bare words as strings, lists as tuples)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _seed_range(n: int) -> range:
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    return range(n)


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
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                                default=f.default, help=f"{help} (default: {f.default})")


def spec_from_args(args: argparse.Namespace, seed: int) -> Any:
    """The run spec of ``seed`` from the options of :func:`add_spec_options` (``--lr`` goes into
    the optimizer's hyper-parameters; no ``--controller-arg`` means no controller)."""
    from chimera.run.spec import RunSpec

    values = {}
    for f in dataclasses.fields(RunSpec):
        value = getattr(args, f.name)
        values[f.name] = parse_kv(value, f.metadata["flag"]) if f.metadata["flag"] else value
    if args.lr is not None:
        values["optimizer_hparams"]["lr"] = args.lr
    values["controller"] = values["controller"] or None
    return RunSpec(**{**values, "seed": seed})


def _cmd_train(args: argparse.Namespace) -> None:
    from chimera.bench.report.tables import runs_table
    from chimera.run.records import RecordWriter
    from chimera.run.trainer import train

    if args.data_dir is not None:  # where cifar10 looks (the same as setting CHIMERA_DATA)
        os.environ["CHIMERA_DATA"] = args.data_dir
    specs = [spec_from_args(args, seed) for seed in args.seed]
    finals = []
    with RecordWriter(args.out) as writer:
        for spec in specs:
            checkpoint = (args.checkpoint.format(run_id=spec.run_id, seed=spec.seed)
                          if args.checkpoint else None)
            finals.append({**spec.to_dict(), **train(spec, writer, progress=not args.quiet,
                                                     checkpoint=checkpoint)})
    print(runs_table(finals))
    print(f"records: {args.out}")


def _cmd_compare_quant(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.compare_quant import quant_specs, run_compare_quant
    from chimera.bench.report.tables import quant_table
    from chimera.run.records import RecordWriter

    specs = quant_specs(_csv(args.quantizers), _seed_range(args.seeds), task=args.task,
                        model=args.model, epochs=args.epochs)
    with RecordWriter(args.out) as writer:
        finals = run_compare_quant(specs, writer, progress=not args.quiet)
    print(quant_table(finals))
    print(f"records: {args.out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from chimera.run.export_run import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.out, format=args.format)
    for key, value in report.items():
        print(f"{key}: {value}")


def _cmd_stress(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.stress import run_stress
    from chimera.bench.report.tables import stress_table
    from chimera.run.records import RecordWriter

    with RecordWriter(args.out) as writer:
        finals = run_stress(_csv(args.problems) or None, _csv(args.optimizers) or None,
                            seeds=_seed_range(args.seeds), steps=args.steps, writer=writer,
                            progress=not args.quiet)
    print(stress_table(finals))
    print(f"records: {args.out}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.bench import run_bench

    start = time.perf_counter()
    summary = run_bench(args.out, seeds=None if args.seeds is None else _seed_range(args.seeds),
                        stress_steps=args.stress_steps, epochs=args.epochs,
                        quant_epochs=args.quant_epochs, rule_epochs=args.rule_epochs,
                        toy_lq_steps=args.toy_lq_steps, workers=args.workers,
                        progress=not args.quiet, suite=args.suite)
    print(summary)
    print(f"records, summary.md, report.csv and plots in {args.out}/ "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"report: {os.path.join(args.out, 'report.md')}")


def _cmd_sweep(args: argparse.Namespace) -> None:
    from chimera.bench.suite.execute import run_sweep

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    print(run_sweep(args.suite, args.out, workers=args.workers, progress=not args.quiet))
    print(f"records, checkpoints/ and summary.md in {args.out}/")


def _cmd_report(args: argparse.Namespace) -> None:
    from chimera.bench.report.write import write_report

    paths = write_report(args.directory, args.out)
    print(paths.markdown, paths.csv, *paths.plots, sep="\n")


def _cmd_toy_lq(args: argparse.Namespace) -> None:
    from chimera.bench.jobs.toy_lq import DEFAULT_W_STD, run_toy_lq
    from chimera.bench.report.tables import toy_lq_table
    from chimera.run.records import RecordWriter

    start = time.perf_counter()
    with RecordWriter(args.out) as writer:
        finals = run_toy_lq(_csv(args.rules) or None, seeds=_seed_range(args.seeds),
                            steps=args.steps, writer=writer, progress=not args.quiet,
                            w_std=DEFAULT_W_STD if args.w_std is None else args.w_std,
                            workers=args.workers)
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
_OUT = "JSONL record file (appended)"
_WORKERS = "processes, one job each (default: the cores available)"
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
    ], True),
    "sweep": (_cmd_sweep, "run (or finish) a TOML suite of runs; resumable", [
        _o("suite", help="the suite file (docs/suites.md)"),
        _o("--out", required=True, help="output folder: <run_id>.jsonl, checkpoints/"),
        _o("--workers", type=int, default=None, help=_WORKERS),
    ], True),
    "toy-lq": (_cmd_toy_lq, "credit quality of each learning rule on the toy LQ problem", [
        _o("--rules", default="", help="comma-separated variants (default: dfa, state_bridge, "
                                       "credit_bridge, credit_bridge_tgw0)"),
        _o("--seeds", type=int, default=3, help=_SEEDS), _o("--steps", type=int, default=8000),
        _o("--w-std", type=float, default=None,
           help="scale of the residual weights W_l (entries N(0, w_std^2/d)); default 0.3 (at "
                "the library's 0.03 the costates barely change with depth)"),
        _o("--workers", type=int, default=None, help=_WORKERS),
        _o("--out", default="toy-lq.jsonl", help=_OUT),
    ], True),
    "report": (_cmd_report, "report.md, report.csv and PNG plots from records only", [
        _o("directory", help="a folder of *.jsonl records (searched recursively)"),
        _o("--out", default=None, help="output folder (default: the records folder)"),
    ], False),
    "perf": (_cmd_perf, "ours vs the PyTorch baseline: optim | layers | rules",
             _add_perf_targets, False),
    "list": (_cmd_list, "list registered optimizers, tasks, models, problems", [], False),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``chimera`` command (one sub-command per ``COMMANDS`` entry)."""
    p = argparse.ArgumentParser(prog="chimera", description=__doc__)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input ends with a one-line ``chimera: error: ...`` and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"chimera: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
