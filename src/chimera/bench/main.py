"""``chimera bench``: the main job on embedded data: the stress suite, and on MNIST-1D the
optimizer, quantizer and learning-rule comparisons.

Record files in the output folder are rewritten on every run; the printed tables are also saved
as ``summary.md`` there, and ``chimera report``'s report.md, report.csv and plots are written
beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chimera.bench.compare_quant import quant_specs, quant_table
from chimera.bench.pool import run_specs
from chimera.bench.records import RecordWriter
from chimera.bench.report import write_report
from chimera.bench.spec import RunSpec
from chimera.bench.stress import run_stress, stress_table
from chimera.bench.summary import format_table, key_columns, pm, summarize

# Published test accuracies (SPEC 4): MNIST-1D (Greydanus 2020), CIFAR-10 ResNet-20 fp32 (Zhu 2017).
PUBLISHED = {("mnist1d", "mlp"): 0.68, ("mnist1d", "cnn"): 0.94, ("cifar10", "resnet20"): 0.9177}

# (model, optimizer, hyper-parameters) of the MNIST-1D comparison; one shared budget: 50 epochs,
# batch 100, cosine decay to 0. Each lr is the best of a 2-3 point sweep on seeds 0-1 (README).
MNIST1D_EPOCHS = 50
MNIST1D_BATCH = 100
MNIST1D_SCHEDULE = "cosine"
MNIST1D_GRID: list[tuple[str, str, dict[str, Any]]] = [
    ("cnn", "adamw", {"lr": 2e-2}),
    ("cnn", "chimera21", {"lr": 2e-2}),
    ("cnn", "stac", {"lr": 1e-2}),
    ("cnn", "lion", {"lr": 3e-3}),
    ("cnn", "sgd", {"lr": 0.1, "momentum": 0.9}),
    ("mlp", "adamw", {"lr": 1e-2}),
]


# The quantizer comparison: every mode on the CNN (see chimera.bench.compare_quant).
QUANT_MODES = ("fp32", "strict_bitnet", "chimera", "int_ternary")
QUANT_EPOCHS = 100


# The learning-rule comparison: ResMLP (d 256, 4 blocks), AdamW (wd 1e-2) with each rule's lr
# (best of a seed-0 sweep, docs/rules.md); a short budget so that the bench stays ~10 minutes.
RULE_EPOCHS = 10
RULE_MODEL = {"d_hidden": 256, "num_blocks": 4}
RULE_LRS = {"backprop": 1e-3, "dfa": 3e-4, "state_bridge": 1e-4, "credit_bridge": 1e-5}


def rule_specs(seeds: Sequence[int], epochs: int = RULE_EPOCHS) -> list[RunSpec]:
    """The run specs of the learning-rule comparison on MNIST-1D."""
    return [
        RunSpec(task="mnist1d", model="resmlp", optimizer="adamw", rule=rule, seed=seed,
                epochs=epochs, batch_size=MNIST1D_BATCH, lr_schedule=MNIST1D_SCHEDULE,
                model_hparams=RULE_MODEL, optimizer_hparams={"lr": lr, "weight_decay": 1e-2})
        for rule, lr in RULE_LRS.items()
        for seed in seeds
    ]


def rule_table(finals: list[dict[str, Any]]) -> str:
    """Accuracy and credit diagnostics (vs exact costates; backprop's are exact) per rule."""
    rows = summarize(finals, ["task", "model", "rule"],
                     ["test_accuracy", "credit_costate_cosine", "credit_perturbation_rho",
                      "credit_nudging", "train_time_s"])
    return format_table(rows, [
        *key_columns("task", "model", "rule"),
        ("test acc (%)", lambda r: pm(r, "test_accuracy", ".1f", 100)),
        ("costate cosine", lambda r: pm(r, "credit_costate_cosine", ".3f")
            if r["rule"] != "backprop" else "1 (exact)"),
        ("perturbation rho", lambda r: pm(r, "credit_perturbation_rho", ".3f")),
        ("nudging", lambda r: pm(r, "credit_nudging", ".3f")),
        ("train time (s)", lambda r: f"{r['train_time_s_mean']:.1f}"),
    ])


def mnist1d_specs(seeds: Sequence[int], epochs: int = MNIST1D_EPOCHS) -> list[RunSpec]:
    """The run specs of the MNIST-1D comparison."""
    return [
        RunSpec(task="mnist1d", model=model, optimizer=opt, seed=seed, epochs=epochs,
                batch_size=MNIST1D_BATCH, optimizer_hparams=hp, lr_schedule=MNIST1D_SCHEDULE)
        for model, opt, hp in MNIST1D_GRID
        for seed in seeds
    ]


def classification_table(finals: list[dict[str, Any]]) -> str:
    """Test accuracy mean ± std over seeds per (task, model, optimizer), with published ones."""
    rows = summarize(finals, ["task", "model", "optimizer"],
                     ["test_accuracy", "train_time_s", "median_step_time_s",
                      "median_optimizer_step_time_s", "state_bytes_per_param", "epochs"])
    return format_table(rows, [
        *key_columns("task", "model", "optimizer"),
        ("test acc (%)", lambda r: pm(r, "test_accuracy", ".1f", 100)),
        ("published (%)", lambda r: f"{PUBLISHED[r['task'], r['model']] * 100:.4g}"
            if (r["task"], r["model"]) in PUBLISHED else "-"),
        ("epochs", lambda r: f"{r['epochs_mean']:.0f}"),
        ("train time (s)", lambda r: f"{r['train_time_s_mean']:.1f}"),
        ("step (ms)", lambda r: f"{r['median_step_time_s_mean'] * 1e3:.2f}"),
        ("opt step (ms)", lambda r: f"{r['median_optimizer_step_time_s_mean'] * 1e3:.3f}"),
        ("state B/param", lambda r: f"{r['state_bytes_per_param_mean']:.1f}"),
    ])


def _fresh_writer(path: Path) -> RecordWriter:
    path.unlink(missing_ok=True)
    return RecordWriter(path)


def run_bench(
    out: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    stress_steps: int = 300,
    epochs: int = MNIST1D_EPOCHS,
    quant_epochs: int = QUANT_EPOCHS,
    rule_epochs: int = RULE_EPOCHS,
    workers: int | None = None,
    progress: bool = True,
) -> str:
    """Run the main job, write records to ``out`` and return the summary (markdown).

    Training runs go to a pool of ``workers`` processes (default: the cores available), one
    torch thread each; the stress suite runs in this process with one thread.
    """
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _fresh_writer(out / "stress.jsonl") as w:
        stress = run_stress(seeds=seeds, steps=stress_steps, writer=w, progress=progress)
    finals = run_specs(mnist1d_specs(seeds, epochs), out / "mnist1d", workers, progress,
                       desc="mnist1d optimizers")
    rules = run_specs(rule_specs(seeds, rule_epochs), out / "rules", workers, progress,
                      desc="mnist1d learning rules")
    quant = run_specs(quant_specs("mnist1d", "cnn", QUANT_MODES, seeds, quant_epochs),
                      out / "quant", workers, progress, desc="mnist1d quantizers")
    summary = (
        f"## Stress problems ({stress_steps} steps, seeds {list(seeds)})\n\n"
        f"{stress_table(stress)}\n\n"
        f"## MNIST-1D optimizers (4000/1000 split, {epochs} epochs, batch {MNIST1D_BATCH}, "
        f"{MNIST1D_SCHEDULE} lr, seeds {list(seeds)})\n\n{classification_table(finals)}\n\n"
        f"## MNIST-1D quantizers (CNN, {quant_epochs} epochs, batch {MNIST1D_BATCH}, "
        f"{MNIST1D_SCHEDULE} lr, seeds {list(seeds)})\n\n{quant_table(quant)}\n\n"
        f"## MNIST-1D learning rules (ResMLP d {RULE_MODEL['d_hidden']}, "
        f"{RULE_MODEL['num_blocks']} blocks, {rule_epochs} epochs, batch {MNIST1D_BATCH}, "
        f"{MNIST1D_SCHEDULE} lr, seeds {list(seeds)})\n\n{rule_table(rules)}\n"
    )
    (out / "summary.md").write_text(summary, encoding="utf-8")
    write_report(out)
    return summary
