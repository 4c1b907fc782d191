import csv
import math
import shutil

import pytest

from chimera.bench.report import plots
from chimera.bench.report.aggregate import STAT_KEYS, seed_stats, summarize
from chimera.bench.report.tables import classification_table, stress_table
from chimera.bench.report.write import collect_configurations, record_files, write_report
from chimera.run.records import RecordWriter, read_records

T_975_2 = 4.302652729749464  # Student t quantile t(0.975, 2 dof), from a table
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train_run(root, config_id, seed, *, final=None, epochs=2, **spec):
    identity = {"run_id": f"{config_id}-s{seed}", "config_id": config_id, "task": "mnist1d",
                "model": "cnn", "optimizer": "adamw", "quantizer": "fp32", "rule": "backprop",
                "seed": seed, "epochs": epochs, **spec}
    with RecordWriter(root / "train" / f"{config_id}-s{seed}.jsonl", identity) as w:
        for epoch in range(1, epochs + 1):
            w.write("step", epoch=epoch, step=epoch * 10, loss=1.0 / epoch)
            w.write("epoch", epoch=epoch, step=epoch * 10, train_loss=1.0 / epoch)
            w.write("eval", epoch=epoch, step=epoch * 10, val_accuracy=0.4 * epoch + 0.01 * seed,
                    val_loss=1.0 / epoch)
        if final is not None:
            w.write("final", epochs=epochs, steps=epochs * 10, **final)


def _final(acc, loss, **extra):
    return {"test_accuracy": acc, "test_loss": loss, "optimizer_state_bytes": 1000,
            "median_step_time_s": 0.002, "median_optimizer_step_time_s": 0.001, **extra}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """a: 3 seeds; b: 3 seeds, ternary; c: like a but 3 epochs and seed 2 missing;
    d: seed 2 unfinished; one stress final."""
    root = tmp_path_factory.mktemp("records")
    for seed, (acc, loss) in enumerate([(0.90, 0.3), (0.92, 0.2), (0.94, 0.1)]):
        _train_run(root, "cfg-a", seed, final=_final(
            acc, loss, val_accuracy=acc - 0.05, val_loss=loss + 0.1, best_val_accuracy=acc,
            best_val_epoch=1, credit_alignment=0.5 + 0.2 * seed,
            costate_cosine_per_layer=[0.1, 0.2]))
        _train_run(root, "cfg-b", seed, quantizer="chimera", final=_final(
            0.8, 0.5, quant_global_effective_bits=1.4 + 0.1 * seed, quant_global_zero_ratio=0.5))
    for seed in (0, 1):
        _train_run(root, "cfg-c", seed, epochs=3, final=_final(0.7, 0.6))
        _train_run(root, "cfg-d", seed, optimizer="sgd", final=_final(0.6, 0.7))
    _train_run(root, "cfg-d", 2, optimizer="sgd")  # interrupted: no final record
    stress_id = {"run_id": "stress-regression-sgd-s0", "config_id": "regression-sgd",
                 "task": "stress/regression", "problem": "regression", "config": "sgd",
                 "optimizer": "sgd", "seed": 0}
    with RecordWriter(root / "stress.jsonl", stress_id) as w:
        w.write("step", step=10, loss=1.0, step_time_s=0.001)
        w.write("final", steps=10, final_loss=0.25, median_step_time_s=0.0004,
                optimizer_state_bytes=64, collision_score=None)
    return root


@pytest.fixture(scope="module")
def report(records, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(records, out)


def _cells(line):
    return [cell.strip() for cell in line.strip("|").split("|")]


def _md_row(text, label):
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} ")]
    assert len(rows) == 1, (label, rows)
    return _cells(rows[0])


def test_seed_stats_by_hand():
    s = seed_stats([0.1, 0.2, None, 0.3])
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.2) and s["std"] == pytest.approx(0.1)
    assert s["ci_low"] == pytest.approx(0.2 - half) and s["ci_high"] == pytest.approx(0.2 + half)
    assert seed_stats([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1, "ci_low": None,
                                 "ci_high": None}
    assert seed_stats([None])["n"] == 0
    # 90% interval is narrower than 95%
    assert seed_stats([1.0, 2.0, 4.0], 0.9)["ci_high"] < seed_stats([1.0, 2.0, 4.0])["ci_high"]
    with pytest.raises(ValueError, match="confidence"):
        seed_stats([1.0, 2.0], confidence=1.0)


def test_summary_tables_and_report_share_one_statistics_path(records):
    recs = read_records(record_files(records))
    finals = [r for r in recs if r["record_type"] == "final"]
    metrics = ["test_accuracy", "quant_global_effective_bits", "final_loss"]
    summary = {row["config_id"]: row for row in summarize(finals, ["config_id"], metrics)}
    for c in collect_configurations(recs):
        row = c.row(metrics)
        assert summary[c.config_id]["seeds"] == row["seeds"] == c.seeds
        for m in metrics:
            for k in STAT_KEYS:
                assert summary[c.config_id][f"{m}_{k}"] == row[f"{m}_{k}"], (c.config_id, m, k)
    table = stress_table([f for f in finals if f["task"].startswith("stress/")])
    assert table.splitlines()[2] == ("| regression | sgd       | 1     | 0.25 ± 0   "
                                     "| 400            | 64          | -         |")


def test_configurations_group_runs_and_flag_gaps(records):
    configs = {c.config_id: c for c in collect_configurations(read_records(record_files(records)))}
    assert set(configs) == {"cfg-a", "cfg-b", "cfg-c", "cfg-d", "regression-sgd"}
    a, c, d = configs["cfg-a"], configs["cfg-c"], configs["cfg-d"]
    assert a.seeds == [0, 1, 2] and a.flags() == ""
    assert c.seeds == [0, 1] and c.missing_seeds == [2] and c.flags() == "⚠ missing seeds [2]"
    assert d.seeds == [0, 1] and d.unfinished_seeds == [2] and d.missing_seeds == []
    assert d.flags() == "⚠ 1 run unfinished (seeds [2])"
    # a and c coincide on task/model/optimizer/quantizer/rule: the differing field tells them apart
    assert a.label == "mnist1d/cnn adamw fp32 backprop epochs=2"
    assert c.label == "mnist1d/cnn adamw fp32 backprop epochs=3"
    assert configs["cfg-b"].label == "mnist1d/cnn adamw chimera backprop"
    assert configs["regression-sgd"].kind == "stress"
    assert configs["regression-sgd"].missing_seeds == []  # stress is its own table


def test_markdown_tables_hold_hand_computed_statistics_and_flags(report):
    text, credit_text = report.markdown.read_text(encoding="utf-8").split("## Credit diagnostics")
    assert "12 record files, 12 runs (11 finished, 1 unfinished), 5 configurations" in text
    a = _md_row(text, "mnist1d/cnn adamw fp32 backprop epochs=2")
    half_acc = 100 * T_975_2 * 0.02 / math.sqrt(3)  # 4.968 points
    assert a[1:4] == ["0,1,2", "3", "92.00 ± 2.00"]
    assert a[4] == f"[{92 - half_acc:.2f}, {92 + half_acc:.2f}]" == "[87.03, 96.97]"
    assert a[5] == "0.2000 ± 0.1000" and a[6] == "[-0.0484, 0.4484]"
    assert a[7:9] == ["-", "-"]  # fp32: no effective bits, no zero ratio
    assert a[9:12] == ["1000", "2.000", "1.000"] and a[12] == ""
    b = _md_row(text, "mnist1d/cnn adamw chimera backprop")
    assert b[7:9] == ["1.500", "0.500"]
    c = _md_row(text, "mnist1d/cnn adamw fp32 backprop epochs=3")
    assert c[2] == "2" and c[-1] == "⚠ missing seeds [2]"
    d = _md_row(text, "mnist1d/cnn sgd fp32 backprop")
    assert d[1:4] == ["0,1", "2", "60.00 ± 0.00"]
    assert d[-1] == "⚠ 1 run unfinished (seeds [2])"
    # credit diagnostics: numeric credit_/costate_ fields only (per-layer lists are skipped)
    credit_text, stress_text = credit_text.split("## Stress configurations")
    assert "costate_cosine_per_layer" not in credit_text
    credit = _md_row(credit_text, "mnist1d/cnn adamw fp32 backprop epochs=2")
    assert credit == ["mnist1d/cnn adamw fp32 backprop epochs=2", "3", "0.7 ± 0.2"]
    stress = _md_row(stress_text, "regression")
    assert stress[:6] == ["regression", "sgd", "0", "1", "0.25 ± 0", "-"]
    assert stress[6:9] == ["400", "64", "-"]


def test_csv_has_one_plain_row_per_configuration(report):
    with report.csv.open(encoding="utf-8") as f:
        rows = {r["config_id"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["cfg-a", "cfg-b", "cfg-c", "cfg-d", "regression-sgd"]
    a = rows["cfg-a"]
    assert (a["kind"], a["optimizer"], a["seeds"], a["n"]) == ("training", "adamw", "0 1 2", "3")
    assert float(a["test_accuracy_mean"]) == pytest.approx(0.92)
    assert float(a["test_accuracy_ci_low"]) == pytest.approx(0.92 - T_975_2 * 0.02 / math.sqrt(3))
    assert float(a["credit_alignment_mean"]) == pytest.approx(0.7)
    assert a["quant_global_effective_bits_mean"] == "" and a["flags"] == ""
    assert rows["cfg-d"]["n"] == "2" and rows["cfg-d"]["unfinished_seeds"] == "2"
    assert rows["cfg-c"]["missing_seeds"] == "2"
    s = rows["regression-sgd"]
    assert (s["kind"], s["problem"], s["final_loss_mean"], s["final_loss_ci_low"]) == (
        "stress", "regression", "0.25", "")


def test_plots_are_png_files_linked_from_the_report(report):
    names = ["learning_curves.png", "accuracy_vs_bits.png", "step_time_vs_memory.png"]
    assert set(names) <= {p.name for p in report.plots}
    text = report.markdown.read_text(encoding="utf-8")
    for path in report.plots:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
        assert f"]({path.name})" in text


def test_learning_curves_follow_validation_accuracy_never_test(records, tmp_path):
    configs = {c.config_id: c for c in collect_configurations(read_records(record_files(records)))}
    epochs, mean, lo, hi = plots._eval_curve(configs["cfg-a"])
    assert epochs.tolist() == [1, 2]
    assert mean.tolist() == pytest.approx([41.0, 81.0])  # 100 * (0.4 e + 0.01 mean seed)
    assert (lo.tolist(), hi.tolist()) == (pytest.approx([40, 80]), pytest.approx([42, 82]))
    with RecordWriter(tmp_path / "old.jsonl", {"run_id": "o-s0", "config_id": "o", "seed": 0,
                                               "task": "digits", "model": "mlp"}) as w:
        w.write("eval", epoch=1, step=1, test_accuracy=0.5)  # records of the earlier protocol
        w.write("final", test_accuracy=0.5)
    (old,) = collect_configurations(read_records(tmp_path / "old.jsonl"))
    assert plots._eval_curve(old) is None


def test_summary_table_shows_final_validation_and_test_accuracy(records):
    finals = [{**f, "train_time_s": 1.0, "state_bytes_per_param": 8.0}
              for f in read_records(record_files(records), record_type="final")
              if f["config_id"] == "cfg-a"]
    header, _, row = classification_table(finals).splitlines()
    cells = dict(zip(_cells(header), _cells(row), strict=True))
    assert (cells["val acc (%)"], cells["test acc (%)"]) == ("87.0 ± 2.0", "92.0 ± 2.0")


def test_report_md_is_reproducible_from_the_records(records, report, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(records, moved)
    again = write_report(moved)  # out defaults to the records directory
    assert again.markdown == moved / "report.md"
    assert again.markdown.read_bytes() == report.markdown.read_bytes()
    assert again.csv.read_bytes() == report.csv.read_bytes()


def _set_line(path, lineno, new):
    """Replace line ``lineno`` of ``path`` by the bytes ``new`` (None: delete it)."""
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1:lineno] = [] if new is None else [new]
    path.write_bytes(b"\n".join(lines))


def _sections(text):
    """report.md's parts by ``## `` title (the part before the first one: "header")."""
    parts = text.split("\n## ")
    return {"header": parts[0], **{p.split("\n", 1)[0]: p for p in parts[1:]}}


def _csv_rows(path):
    with path.open(encoding="utf-8") as f:
        return {r["config_id"]: r for r in csv.DictReader(f)}


def test_corrupt_lines_are_skipped_flagged_and_leave_the_rest_of_the_statistics(records,
                                                                               tmp_path):
    """Line 3 (an eval record) of cfg-a seed 1 and line 7 (the final record) of cfg-b seed 2
    are corrupt: the report equals that of the records without those lines, plus flags."""
    broken, minus = tmp_path / "broken", tmp_path / "minus"
    for root in (broken, minus):
        shutil.copytree(records, root)
    _set_line(broken / "train" / "cfg-a-s1.jsonl", 3, b'{"run_id": "cfg-a-s1", \x00\xff')
    _set_line(broken / "train" / "cfg-b-s2.jsonl", 7, b'{"record_type": "final", "seed')
    _set_line(minus / "train" / "cfg-a-s1.jsonl", 3, None)
    _set_line(minus / "train" / "cfg-b-s2.jsonl", 7, None)
    bad, ref = write_report(broken), write_report(minus)
    text, ref_text = (_sections(r.markdown.read_text(encoding="utf-8")) for r in (bad, ref))
    note = "⚠ 2 corrupt record lines skipped (train/cfg-a-s1.jsonl:3, train/cfg-b-s2.jsonl:7)."
    assert note in text["header"] and "corrupt" not in "".join(ref_text.values())
    training = text["Training configurations"]
    a = _md_row(training, "mnist1d/cnn adamw fp32 backprop epochs=2")
    assert a[-1] == "⚠ 1 corrupt record line skipped (train/cfg-a-s1.jsonl:3)"
    b = _md_row(training, "mnist1d/cnn adamw chimera backprop")
    assert b[1:3] == ["0,1", "2"]  # seed 2 lost its final record: unfinished, out of the stats
    assert b[-1] == ("⚠ 1 run unfinished (seeds [2]); "
                     "⚠ 1 corrupt record line skipped (train/cfg-b-s2.jsonl:7)")
    for title, section in text.items():
        rows, ref_rows = ([_cells(x) for x in t.splitlines() if x.startswith("| ")]
                          for t in (section, ref_text[title]))
        assert len(rows) == len(ref_rows), title
        for cells, ref_cells in zip(rows, ref_rows, strict=True):
            flags = -1 if title != "Credit diagnostics (final records)" else len(cells)
            assert cells[:flags] == ref_cells[:flags], (title, cells[0])
    bad_rows, ref_rows = _csv_rows(bad.csv), _csv_rows(ref.csv)
    assert list(bad_rows) == list(ref_rows)
    for config_id, row in bad_rows.items():
        assert {k: v for k, v in row.items() if k != "flags"} == \
            {k: v for k, v in ref_rows[config_id].items() if k != "flags"}, config_id
    assert bad_rows["cfg-c"]["flags"] == ref_rows["cfg-c"]["flags"] == "⚠ missing seeds [2]"


def test_a_metric_of_the_wrong_type_is_flagged_and_left_out(tmp_path):
    for seed, acc in enumerate([0.9, "0.92", 0.94]):
        _train_run(tmp_path, "cfg-x", seed, final=_final(acc, [0.2] if seed == 2 else 0.3))
    paths = write_report(tmp_path, tmp_path / "out")
    row = _md_row(paths.markdown.read_text(encoding="utf-8"), "mnist1d/cnn adamw fp32 backprop")
    assert row[1:4] == ["0,1,2", "3", "92.00 ± 2.83"]  # seeds 0 and 2 only: mean 0.92, std 0.028
    assert row[5] == "0.3000 ± 0.0000"
    assert row[-1] == ("⚠ non-numeric test_accuracy in run cfg-x-s1; "
                       "⚠ non-numeric test_loss in run cfg-x-s2")
    csv_row = _csv_rows(paths.csv)["cfg-x"]
    assert (csv_row["test_accuracy_n"], csv_row["test_loss_n"]) == ("2", "2")
    assert csv_row["flags"] == row[-1]


def test_clean_records_give_no_corruption_or_type_notes(report):
    text = report.markdown.read_text(encoding="utf-8")
    assert "corrupt" not in text and "non-numeric" not in text


def test_plots_without_data_are_skipped_and_said_so(tmp_path):
    with RecordWriter(tmp_path / "s.jsonl", {"run_id": "r", "config_id": "p-c", "seed": 0,
                                             "task": "stress/p", "problem": "p",
                                             "config": "c"}) as w:
        w.write("final", final_loss=1.0, median_step_time_s=0.001, optimizer_state_bytes=8)
    paths = write_report(tmp_path, tmp_path / "out")
    assert [p.name for p in paths.plots] == ["step_time_vs_memory.png"]
    text = paths.markdown.read_text(encoding="utf-8")
    assert ("`learning_curves.png`: skipped (no eval records with val_accuracy of a training "
            "run)") in text
    assert "`accuracy_vs_bits.png`: skipped" in text and "## Training configurations" not in text


def test_missing_or_empty_directory_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty.*no record files"):
        write_report(tmp_path / "empty")


def test_records_written_before_the_architecture_change_are_still_reported(tmp_path):
    """Records of `chimera bench` at commit 12d1073 (digits MLP eval + final records of seeds
    0-2, and two stress configurations), reported by today's code."""
    from pathlib import Path

    fixture = Path(__file__).parents[1] / "fixtures" / "records_12d1073"
    paths = write_report(fixture, tmp_path)
    text = paths.markdown.read_text(encoding="utf-8")
    assert "9 runs (9 finished, 0 unfinished), 3 configurations (1 training, 2 stress)" in text
    assert "| digits/mlp adamw fp32 backprop | 0,1,2 | 3 | 96.76 ± 0.16 |" in text
    assert "| regression | chimera21 | 0,1,2 | 3 | 0.1308 ± 0.04277 |" in text
    assert len(paths.csv.read_text(encoding="utf-8").splitlines()) == 4  # header + 3 configs


def test_stress_table_of_runs_shorter_than_the_timing_warm_up_shows_a_dash():
    finals = [{"problem": "saddle", "config": "adamw", "seed": s, "steps": 3, "final_loss": 1.0,
               "median_step_time_s": None, "optimizer_state_bytes": 100,
               "collision_score": None} for s in (0, 1)]
    row = stress_table(finals).splitlines()[-1]
    assert row.split("|")[5].strip() == "-" and "1 ± 0" in row
