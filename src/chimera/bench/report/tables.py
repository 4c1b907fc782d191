"""Summary tables of training runs (mean ± std over seeds per configuration), as printed by
``chimera train``, ``chimera sweep`` and ``chimera bench``."""

from __future__ import annotations

from typing import Any

from chimera.bench.jobs.compare_quant import quant_table
from chimera.bench.report.stats import format_table, key_columns, pm, summarize

# Published test accuracies (docs/algorithms.md#tasks): MNIST-1D (Greydanus 2020), CIFAR-10
# ResNet-20 fp32 (Zhu 2017).
PUBLISHED = {("mnist1d", "mlp"): 0.68, ("mnist1d", "cnn"): 0.94, ("cifar10", "resnet20"): 0.9177}


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


def runs_table(finals: list[dict[str, Any]]) -> str:
    """The table that fits a set of runs: the rule table when any run uses a learning rule other
    than backprop, else the quantizer table when any run is ternary, else the classification
    table."""
    if any(f["rule"] != "backprop" for f in finals):
        return rule_table(finals)
    if any(f["quantizer"] != "fp32" for f in finals):
        return quant_table(finals)
    return classification_table(finals)
