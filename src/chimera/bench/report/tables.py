"""The harness's one table module: aligned markdown-compatible text tables of statistics rows
(:mod:`chimera.bench.report.aggregate`).

- summary tables, one row per group of final records (mean ± std over seeds), as printed by
  ``chimera train``, ``compare-quant``, ``stress``, ``toy-lq``, ``sweep`` and ``bench`` and
  written to summary.md: :func:`classification_table`, :func:`rule_table`, :func:`quant_table`,
  :func:`stress_table`, :func:`toy_lq_table`, and :func:`runs_table` to pick among the first
  three;
- report tables, one row per configuration (``Configuration.row`` of
  :mod:`chimera.bench.report.write`, with 95% CIs and flags), as written to report.md:
  :func:`training_report_table`, :func:`credit_report_table`, :func:`toy_lq_report_table`,
  :func:`stress_report_table`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from chimera.bench.report.aggregate import summarize

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], Any]]  # (header, row -> cell)

# Published test accuracies (docs/algorithms.md#tasks): MNIST-1D (Greydanus 2020), CIFAR-10
# ResNet-20 fp32 (Zhu 2017).
PUBLISHED = {("mnist1d", "mlp"): 0.68, ("mnist1d", "cnn"): 0.94, ("cifar10", "resnet20"): 0.9177}


def format_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """A markdown-compatible table: ``columns`` are (header, row -> cell) pairs."""
    cells = [[str(fn(r)) for _, fn in columns] for r in rows]
    headers = [h for h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(c) for c in cells)])


# --- cells of a statistics row ---------------------------------------------------------------

def pm(row: Row, metric: str, fmt: str = ".4f", scale: float = 1.0) -> str:
    """``mean ± std`` of ``metric`` in a statistics row ('-' when absent)."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None:
        return "-"
    return f"{mean * scale:{fmt}} ± {std * scale:{fmt}}"


def mean_cell(row: Row, metric: str, fmt: str, scale: float = 1.0) -> str:
    """The mean of ``metric`` alone ('-' when absent)."""
    value = row.get(f"{metric}_mean")
    return "-" if value is None else f"{value * scale:{fmt}}"


def ci_cell(row: Row, metric: str, fmt: str, scale: float = 1.0) -> str:
    """``[ci_low, ci_high]`` of ``metric`` ('-' when there is no interval, n < 2)."""
    lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    return "-" if lo is None else f"[{lo * scale:{fmt}}, {hi * scale:{fmt}}]"


def seed_list(row: Row, empty: str = "") -> str:
    """The row's seeds, comma-separated (``empty`` when it has none)."""
    return ",".join(map(str, row["seeds"])) or empty


def seed_count(row: Row) -> int:
    """How many seeds the row has."""
    return len(row["seeds"])


def key_columns(*keys: str) -> list[Column]:
    """Leading table columns: the grouping ``keys`` as they are, then the seeds of the group."""
    return [*((k, lambda r, k=k: r[k]) for k in keys), ("seeds", seed_list)]


# --- summary tables: one row per group of final records ----------------------------------------

def classification_table(finals: list[Row]) -> str:
    """Final validation and test accuracy mean ± std over seeds per (task, model, optimizer),
    with published ones."""
    rows = summarize(finals, ["task", "model", "optimizer"],
                     ["val_accuracy", "test_accuracy", "train_time_s", "median_step_time_s",
                      "median_optimizer_step_time_s", "state_bytes_per_param", "epochs"])
    return format_table(rows, [
        *key_columns("task", "model", "optimizer"),
        ("val acc (%)", lambda r: pm(r, "val_accuracy", ".1f", 100)),
        ("test acc (%)", lambda r: pm(r, "test_accuracy", ".1f", 100)),
        ("published (%)", lambda r: f"{PUBLISHED[r['task'], r['model']] * 100:.4g}"
            if (r["task"], r["model"]) in PUBLISHED else "-"),
        ("epochs", lambda r: f"{r['epochs_mean']:.0f}"),
        ("train time (s)", lambda r: f"{r['train_time_s_mean']:.1f}"),
        ("step (ms)", lambda r: mean_cell(r, "median_step_time_s", ".2f", 1e3)),
        ("opt step (ms)", lambda r: mean_cell(r, "median_optimizer_step_time_s", ".3f", 1e3)),
        ("state B/param", lambda r: f"{r['state_bytes_per_param_mean']:.1f}"),
    ])


def rule_table(finals: list[Row]) -> str:
    """Accuracy and credit diagnostics (vs exact costates; backprop's are exact) per rule."""
    rows = summarize(finals, ["task", "model", "rule"],
                     ["val_accuracy", "test_accuracy", "credit_costate_cosine",
                      "credit_perturbation_rho", "credit_nudging", "train_time_s"])
    return format_table(rows, [
        *key_columns("task", "model", "rule"),
        ("val acc (%)", lambda r: pm(r, "val_accuracy", ".1f", 100)),
        ("test acc (%)", lambda r: pm(r, "test_accuracy", ".1f", 100)),
        ("costate cosine", lambda r: pm(r, "credit_costate_cosine", ".3f")
            if r["rule"] != "backprop" else "1 (exact)"),
        ("perturbation rho", lambda r: pm(r, "credit_perturbation_rho", ".3f")),
        ("nudging", lambda r: pm(r, "credit_nudging", ".3f")),
        ("train time (s)", lambda r: f"{r['train_time_s_mean']:.1f}"),
    ])


def quant_table(finals: list[Row]) -> str:
    """Accuracy, effective bits, zero ratio and optimizer bytes per parameter per quantizer
    (``chimera compare-quant``)."""
    rows = summarize(finals, ["task", "model", "quantizer", "optimizer"],
                     ["val_accuracy", "test_accuracy", "quant_global_effective_bits",
                      "quant_global_zero_ratio", "state_bytes_per_param",
                      "ternary_state_bytes_per_weight", "train_time_s"])
    return format_table(rows, [
        ("task", lambda r: r["task"]),
        ("model", lambda r: r["model"]),
        ("quantizer", lambda r: r["quantizer"]),
        ("optimizer", lambda r: r["optimizer"]),
        ("seeds", seed_list),
        ("val acc (%)", lambda r: pm(r, "val_accuracy", ".1f", 100)),
        ("test acc (%)", lambda r: pm(r, "test_accuracy", ".1f", 100)),
        ("effective bits", lambda r: pm(r, "quant_global_effective_bits", ".3f")),
        ("zero ratio", lambda r: pm(r, "quant_global_zero_ratio", ".3f")),
        ("opt state B/param", lambda r: f"{r['state_bytes_per_param_mean']:.2f}"),
        ("int state B/ternary weight", lambda r: pm(r, "ternary_state_bytes_per_weight", ".2f")),
        ("train time (s)", lambda r: f"{r['train_time_s_mean']:.1f}"),
    ])


def runs_table(finals: list[Row]) -> str:
    """The table that fits a set of runs: the rule table when any run uses a learning rule other
    than backprop, else the quantizer table when any run is ternary, else the classification
    table."""
    if any(f["rule"] != "backprop" for f in finals):
        return rule_table(finals)
    if any(f["quantizer"] != "fp32" for f in finals):
        return quant_table(finals)
    return classification_table(finals)


def stress_table(finals: list[Row]) -> str:
    """Final loss mean ± std over seeds, median step time, state bytes and collision score per
    stress problem and optimizer configuration (``chimera stress``)."""
    rows = summarize(finals, ["problem", "config"],
                     ["final_loss", "median_step_time_s", "optimizer_state_bytes",
                      "collision_score"])
    return format_table(rows, [
        ("problem", lambda r: r["problem"]),
        ("optimizer", lambda r: r["config"]),
        ("seeds", seed_count),
        ("final loss", lambda r: pm(r, "final_loss", ".4g")),
        ("step time (µs)", lambda r: mean_cell(r, "median_step_time_s", ".0f", 1e6)),
        ("state bytes", lambda r: f"{r['optimizer_state_bytes_mean']:.0f}"),
        ("collision", lambda r: pm(r, "collision_score", ".3f")),
    ])


def toy_lq_table(finals: list[Row]) -> str:
    """docs/algorithms.md#toy-lq table (``chimera toy-lq``): mean ± std over seeds of costate
    cosine, perturbation rho, nudging and the bridge residual, and the wall time per run; a last
    line gives the reference cosine of broadcasting the exact terminal costate λ_L to every
    layer."""
    rows = summarize(finals, ["variant"], ["costate_cosine", "perturbation_rho", "nudging",
                                           "bridge_residual", "train_time_s",
                                           "terminal_broadcast_cosine"])
    table = format_table(rows, [
        ("rule", lambda r: r["variant"]),
        ("seeds", seed_count),
        ("costate cosine", lambda r: pm(r, "costate_cosine", ".3f")),
        ("perturbation rho", lambda r: pm(r, "perturbation_rho", ".3f")),
        ("nudging", lambda r: pm(r, "nudging", ".3f")),
        ("bridge residual", lambda r: pm(r, "bridge_residual", ".2g")),
        ("time/run (s)", lambda r: f"{r['train_time_s_mean']:.0f}"),
    ])
    ref = [r["terminal_broadcast_cosine_mean"] for r in rows]
    return table + f"\nreference: a_l = λ_L (exact terminal costate) gives costate cosine " \
                   f"{sum(ref) / len(ref):.3f}"


# --- report tables: one row per configuration, with 95% CIs and flags --------------------------

_REPORT_SEED_COLUMNS: list[Column] = [("seeds", lambda r: seed_list(r, empty="-")),
                                       ("n", lambda r: r["n"])]


TRAINING_REPORT_COLUMNS: list[Column] = [
    ("configuration", lambda r: r["label"]),
    *_REPORT_SEED_COLUMNS,
    ("test acc (%)", lambda r: pm(r, "test_accuracy", ".2f", 100)),
    ("95% CI (%)", lambda r: ci_cell(r, "test_accuracy", ".2f", 100)),
    ("test loss", lambda r: pm(r, "test_loss", ".4f")),
    ("95% CI", lambda r: ci_cell(r, "test_loss", ".4f")),
    ("eff. bits", lambda r: mean_cell(r, "quant_global_effective_bits", ".3f")),
    ("zero ratio", lambda r: mean_cell(r, "quant_global_zero_ratio", ".3f")),
    ("opt. state (B)", lambda r: mean_cell(r, "optimizer_state_bytes", ".0f")),
    ("step (ms)", lambda r: mean_cell(r, "median_step_time_s", ".3f", 1e3)),
    ("opt. step (ms)", lambda r: mean_cell(r, "median_optimizer_step_time_s", ".3f", 1e3)),
    ("flags", lambda r: r["flags"]),
]
TOY_LQ_REPORT_COLUMNS: list[Column] = [
    ("rule variant", lambda r: r["variant"]),
    *_REPORT_SEED_COLUMNS,
    ("costate cosine", lambda r: pm(r, "costate_cosine", ".3f")),
    ("95% CI", lambda r: ci_cell(r, "costate_cosine", ".3f")),
    ("perturbation rho", lambda r: pm(r, "perturbation_rho", ".3f")),
    ("nudging", lambda r: pm(r, "nudging", ".3f")),
    ("bridge residual", lambda r: pm(r, "bridge_residual", ".3g")),
    ("time/run (s)", lambda r: mean_cell(r, "train_time_s", ".1f")),
    ("flags", lambda r: r["flags"]),
]
STRESS_REPORT_COLUMNS: list[Column] = [
    ("problem", lambda r: r["problem"]),
    ("config", lambda r: r["config"]),
    *_REPORT_SEED_COLUMNS,
    ("final loss", lambda r: pm(r, "final_loss", ".4g")),
    ("95% CI", lambda r: ci_cell(r, "final_loss", ".4g")),
    ("step (µs)", lambda r: mean_cell(r, "median_step_time_s", ".0f", 1e6)),
    ("opt. state (B)", lambda r: mean_cell(r, "optimizer_state_bytes", ".0f")),
    ("collision", lambda r: pm(r, "collision_score", ".3f")),
    ("flags", lambda r: r["flags"]),
]


def training_report_table(rows: Sequence[Row]) -> str:
    """report.md's training configurations: accuracy and loss with CIs, quantization, memory,
    step times, flags."""
    return format_table(rows, TRAINING_REPORT_COLUMNS)


def credit_report_table(rows: Sequence[Row], fields: Sequence[str]) -> str:
    """report.md's credit diagnostics: mean ± std of every credit field per configuration."""
    return format_table(rows, [("configuration", lambda r: r["label"]), ("n", lambda r: r["n"]),
                               *((f, lambda r, f=f: pm(r, f, ".4g")) for f in fields)])


def toy_lq_report_table(rows: Sequence[Row]) -> str:
    """report.md's toy LQ credit quality per rule variant."""
    return format_table(rows, TOY_LQ_REPORT_COLUMNS)


def stress_report_table(rows: Sequence[Row]) -> str:
    """report.md's stress configurations: final loss with CI, step time, memory, collision."""
    return format_table(rows, STRESS_REPORT_COLUMNS)
