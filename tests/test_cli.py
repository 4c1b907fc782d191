import math
import os
import re
from pathlib import Path

import pytest

from chimera.cli import main, parse_kv
from chimera.run.records import read_records


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


TRAIN = ["train", "--task", "digits", "--model", "mlp", "--epochs", "1", "--quiet"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--optimizer", "adamx"], "unknown optimizer 'adamx'; known: sgd, adam, adamw"),
    (["--task", "imagenet"], "unknown task 'imagenet'; known:"),
    (["--model", "vit"], "unknown model 'vit'; known:"),
    (["--lr", "-1"], "(?i)(invalid learning rate|lr must be a number >= 0)"),
    (["--opt-arg", "betas"], "--opt-arg must look like KEY=VALUE, got 'betas'"),
    (["--opt-arg", "momentum=0.9", "--optimizer", "adamw"], "no hyper-parameter 'momentum'"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--epochs", "x"], r"argument --epochs: invalid int value: 'x' \(see chimera train --help\)"),
    (["--model-arg", "hidden=0"], "hidden"),
    # types against the target's signature, before anything runs
    (["--opt-arg", "weight_decay=abc"],
     "optimizer 'adamw' hyper-parameter weight_decay must be of type float, got 'abc'"),
    (["--model-arg", "hidden=abc"], "hidden of model 'mlp': Input should be a valid integer"),
    (["--opt-arg", 'lr="0.01"'], "hyper-parameter lr must be of type float .*, got '0.01'"),
    (["--opt-arg", "betas=[0.9,"], r"--opt-arg betas must be a JSON value .*, got '\[0.9,'"),
    (["--opt-arg", "lr=0.1", "--opt-arg", "lr=0.2"], "--opt-arg lr must be given once"),
    # non-finite numbers parse as floats and are rejected where a finite one is needed
    (["--optimizer", "chimera21", "--opt-arg", "noise_threshold=nan"],
     "optimizer_hparams.noise_threshold must be a finite number, got nan"),
    (["--opt-arg", "lr=Infinity"], "optimizer_hparams.lr must be a finite number, got inf"),
    (["--lr", "inf"], "optimizer_hparams.lr must be a finite number, got inf"),
    (["--lr", "1e300"], r"a step of optimizer 'adamw' with \{'lr': 1e\+300\}: .*overflow"),
    (["--lr", "0.1", "--opt-arg", "lr=0.2"], "--lr and --opt-arg lr both set the learning rate"),
    (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--seed", "0", "0"], r"--seed must be distinct seeds, got \[0, 0\]"),
    (["--checkpoint", "ck_{runid}.pt"],
     "--checkpoint must be a path whose only placeholders are {run_id} and {seed}"),
    (["--checkpoint", "ck_{0}.pt"], "--checkpoint must be a path whose only placeholders"),
    (["--seed", "0", "1", "--checkpoint", "ck.pt"],
     "--checkpoint must be a path with {run_id} or {seed} when several seeds train"),
    # arguments that do not apply
    (["--quant-arg", 'skip=["first"]'], "quantizer 'fp32' converts no layer"),
    (["--rule-arg", "K=3"], "rule 'backprop' takes no rule_hparams"),
    (["--controller-arg", "target_bits=1.3"],
     "a controller needs a quantizer with BitLinear/BitConv layers .* got quantizer 'fp32'"),
    (["--quantizer", "int_ternary", "--optimizer", "scaled_optum", "--controller-arg",
      "target_bits=1.3"], "got quantizer 'int_ternary'"),
    (["--quantizer", "chimera", "--model-arg", "depth=1"],
     r"quantizer 'chimera' would convert no layer: skip \['first', 'last'\]"),
    (["--model", "resnet20"], "input_shape must be"),
    (["--epochs", "99999999999999999999"], r"epochs must be a positive integer \(at most"),
    (["--data-dir", "."], "--data-dir must be given only with --task cifar10"),
    (["--seed", "99999999999999999999999"], r"seed must be a non-negative integer \(at most"),
    (["--opt-arg", "capturable=true"], "a step of optimizer 'adamw' with {'capturable': True}"),
    (["--max-batches", "0"], "max_batches must be a positive integer"),
    (["--eval-max-batches", "two"], "expected an integer or 'none'"),
    (["--quantizer", "chimera", "--no-controller", "--controller-arg", "target_bits=1"],
     "--no-controller and --controller-arg contradict each other"),
])
def test_bad_input_gives_a_one_line_error(capsys, tmp_path, argv, message):
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(capsys, *TRAIN, "--out", str(out), *argv)
    assert code == 2
    assert err.startswith("chimera: error: ") and re.search(message, err)
    assert err.count("\n") == 1
    assert not out.exists()  # nothing ran


def assert_one_line(code, err, message):
    assert code == 2 and err.count("\n") == 1 and err.startswith("chimera: error: ")
    assert re.search(message, err), err


def test_output_paths_are_checked_before_anything_runs(capsys, tmp_path):
    afile, folder = tmp_path / "afile", tmp_path / "folder"
    afile.write_text("")
    folder.mkdir()
    for argv, message in [
        (["--out", str(afile / "r.jsonl")], r"--out must be a path under folders \(.*afile is a "
                                              r"file\)"),
        (["--out", str(folder)], r"--out must be a file path \(it is a folder\)"),
        (["--out", str(folder / "r.jsonl"), "--checkpoint", str(afile / "{seed}" / "c.pt")],
         "--checkpoint must be a path under folders"),
    ]:
        assert_one_line(*run_cli(capsys, *TRAIN, *argv)[::2], message)
    assert not (folder / "r.jsonl").exists()
    code, _, err = run_cli(capsys, "export", str(afile), str(folder))
    assert_one_line(code, err, r"out must be a file path \(it is a folder\)")
    for command in (["bench"], ["sweep", str(afile)]):
        code, _, err = run_cli(capsys, *command, "--out", str(afile))
        assert_one_line(code, err, r"--out must be a folder path \(it is a file\)")


def test_a_read_only_output_folder_is_one_line(capsys, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root may write anywhere, so the refusal is simulated where the check asks
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    code, _, err = run_cli(capsys, *TRAIN, "--out", str(locked / "sub" / "r.jsonl"))
    assert_one_line(code, err, r"--out must be a path in a writable folder \(.*locked is not "
                               r"writable\)")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "c.pt"), str(locked / "m.st"))
    assert_one_line(code, err, "out must be a path in a writable folder")
    assert not list(locked.iterdir())


def test_an_os_error_on_a_path_at_run_time_is_one_line(capsys, tmp_path, monkeypatch):
    import chimera.run.trainer

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/ck.pt")

    monkeypatch.setattr(chimera.run.trainer, "train", denied)
    code, _, err = run_cli(capsys, *TRAIN, "--out", str(tmp_path / "r.jsonl"))
    assert_one_line(code, err, "^chimera: error: Permission denied: /data/ck.pt$")


def test_an_internal_error_keeps_its_traceback_and_asks_for_a_report(capsys, tmp_path,
                                                                     monkeypatch):
    import chimera.run.trainer

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(chimera.run.trainer, "train", broken)
    code, _, err = run_cli(capsys, *TRAIN, "--out", str(tmp_path / "r.jsonl"))
    assert code == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.rstrip().splitlines()[-1].startswith(
        "chimera: internal error: this is a bug in chimera; please report it")


def test_a_closed_stdout_ends_quietly():
    """``chimera list | head -0``: the reader is gone before the first line; no traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "chimera", "list"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(("argv", "message"), [
    (["compare-quant", "--quantizers", "fp32,fp32"],
     "--quantizers must be distinct names, got 'fp32,fp32'"),
    (["compare-quant", "--quantizers", ","], "--quantizers must be comma-separated names, none "
                                             "empty, got ','"),
    (["compare-quant", "--quantizers", ""], "--quantizers must be comma-separated names"),
    (["compare-quant", "--quantizers", "fp32", "--model", "resnet20"], "input_shape must be"),
    (["stress", "--problems", "regression,regression"], "--problems must be distinct names"),
    (["stress", "--optimizers", "adamw,"], "--optimizers must be comma-separated names"),
    (["stress", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["toy-lq", "--rules", "dfa,dfa"], "--rules must be distinct names"),
    (["toy-lq", "--rules", "dfa", "--w-std", "-1"], "--w-std must be a number >= 0"),
    (["toy-lq", "--workers", "0"], "--workers must be an integer >= 1, got 0"),
])
def test_lists_and_numbers_of_the_other_jobs(capsys, tmp_path, argv, message):
    out = tmp_path / "o.jsonl"
    code, _, err = run_cli(capsys, *argv, "--out", str(out), "--quiet")
    assert_one_line(code, err, message)
    assert not out.exists()


def test_bench_overrides_need_a_place_in_the_suite(capsys, tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text('task = "digits"\nmodel = "mlp"\nseeds = [0]\nepochs = 1\n')
    out = tmp_path / "out"
    for flag, place in [("--stress-steps", r"\[stress\] section"),
                        ("--toy-lq-steps", r"\[toy_lq\] section"),
                        ("--quant-epochs", "grid named 'quant'"),
                        ("--rule-epochs", "grid named 'rules'")]:
        code, _, err = run_cli(capsys, "bench", "--suite", str(suite), flag, "5", "--out",
                               str(out))
        assert_one_line(code, err, f"{flag} has nothing to set: suite .*s.toml has no {place}$")
    code, _, err = run_cli(capsys, "bench", "--stress-steps", "0", "--out", str(out))
    assert_one_line(code, err, "--stress-steps must be an integer >= 1, got 0")
    assert not out.exists()


def test_train_command_writes_records_and_prints_table(capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    code, stdout, _ = run_cli(capsys, *TRAIN, "--seed", "0", "1", "--out", str(out),
                              "--optimizer", "stac", "--lr", "0.001")
    assert code == 0
    finals = read_records(out, record_type="final")
    assert [r["seed"] for r in finals] == [0, 1]
    assert "| digits | mlp   | stac" in stdout


def test_train_with_a_learning_rule_prints_the_rule_table(capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "train", "--task", "digits", "--model", "resmlp",
                              "--model-arg", "d_hidden=16", "--model-arg", "num_blocks=1",
                              "--rule", "dfa", "--epochs", "1", "--quiet",
                              "--out", str(tmp_path / "r.jsonl"))
    assert code == 0
    assert "costate cosine" in stdout and "| dfa" in stdout


def test_stress_command(capsys, tmp_path):
    out = tmp_path / "s.jsonl"
    code, stdout, _ = run_cli(capsys, "stress", "--problems", "saddle", "--optimizers",
                              "adamw,chimera21-psi-int8", "--seeds", "2", "--steps", "30",
                              "--out", str(out), "--quiet")
    assert code == 0
    finals = read_records(out, record_type="final")
    assert len(finals) == 4
    assert "chimera21-psi-int8" in stdout and "saddle" in stdout


def test_stress_rejects_unknown_names_before_running(capsys, tmp_path):
    out = tmp_path / "s.jsonl"
    code, _, err = run_cli(capsys, "stress", "--optimizers", "adamw,nope", "--out", str(out))
    assert code == 2 and "unknown stress configuration 'nope'" in err
    assert not out.exists() or out.read_text() == ""


def test_list_names_every_registry(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    assert "optimizers: sgd, adam, adamw, lion, chimera21, stac" in out
    assert "mnist1d" in out and "cnn" in out and "noisy_quadratic" in out


def test_parse_kv():
    assert parse_kv(["lr=0.1", "betas=[0.9,0.99]", "mode=fast", "skip=features.0", 'name="a b"',
                     "on=true", "off=null"], "x") == {
        "lr": 0.1, "betas": (0.9, 0.99), "mode": "fast", "skip": "features.0", "name": "a b",
        "on": True, "off": None}
    values = parse_kv(["a=nan", "b=inf", "c=-inf", "d=Infinity", "e=NaN", "f=-Infinity"], "x")
    assert math.isnan(values.pop("a")) and math.isnan(values.pop("e"))
    assert values == {"b": math.inf, "c": -math.inf, "d": math.inf, "f": -math.inf}
    for item, message in [("lr=", "^--x lr must be a JSON value"), ("lr=1e-3x", "got '1e-3x'$"),
                          ("s=a b", "got 'a b'$"), ("=1", "^--x must look like KEY=VALUE")]:
        with pytest.raises(ValueError, match=message):
            parse_kv([item], "--x")
    with pytest.raises(ValueError, match="^--x lr must be given once, got 'lr=2'$"):
        parse_kv(["lr=1", "lr=2"], "--x")


def test_train_checkpoint_per_seed(capsys, tmp_path):
    code, _, _ = run_cli(capsys, *TRAIN, "--seed", "3", "4", "--out", str(tmp_path / "r.jsonl"),
                         "--checkpoint", str(tmp_path / "ck" / "s{seed:02d}.pt"))
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["s03.pt", "s04.pt"]


def test_train_checkpoint_then_export(capsys, tmp_path):
    ckpt = tmp_path / "{run_id}.pt"
    code, _, _ = run_cli(capsys, *TRAIN, "--quantizer", "chimera", "--checkpoint", str(ckpt),
                         "--out", str(tmp_path / "r.jsonl"))
    assert code == 0
    (path,) = tmp_path.glob("digits-mlp-adamw-*-s0.pt")
    code, out, _ = run_cli(capsys, "export", str(path), str(tmp_path / "m.safetensors"))
    assert code == 0 and "bits_per_weight: 1.6" in out
    code, _, err = run_cli(capsys, "export", str(tmp_path / "missing.pt"), str(tmp_path / "x"))
    assert code == 2 and "checkpoint not found" in err
    # the checkpoint and the records are never overwritten by an export
    before = path.read_bytes()
    assert_one_line(*run_cli(capsys, "export", str(path), str(path))[::2],
                    "out must be another path than the checkpoint")
    assert_one_line(*run_cli(capsys, "export", str(path), str(tmp_path / "r.jsonl"))[::2],
                    "out must be a new file or an existing .safetensors file")
    assert path.read_bytes() == before


def test_records_and_checkpoint_must_be_different_files(capsys, tmp_path):
    same = tmp_path / "same.pt"
    code, _, err = run_cli(capsys, *TRAIN, "--out", str(same), "--checkpoint", str(same))
    assert_one_line(code, err, "--checkpoint must be another path than --out")
    assert not same.exists()


def test_compare_quant_command(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "compare-quant", "--task", "digits", "--model", "mlp",
                           "--quantizers", "fp32,chimera,int_ternary", "--seeds", "1", "--epochs",
                           "1", "--out", str(tmp_path / "q.jsonl"), "--quiet")
    assert code == 0
    assert "| digits | mlp   | int_ternary | scaled_optum" in out
    code, _, err = run_cli(capsys, "compare-quant", "--quantizers", "fp32,fp8", "--out",
                           str(tmp_path / "q2.jsonl"))
    assert code == 2 and "unknown quantizer 'fp8'" in err


def test_report_command(capsys, tmp_path):
    run_cli(capsys, *TRAIN, "--seed", "0", "1", "--out", str(tmp_path / "runs" / "r.jsonl"))
    code, out, _ = run_cli(capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path))
    assert code == 0 and "report.md" in out
    assert "digits/mlp" in (tmp_path / "report.md").read_text()
    code, _, err = run_cli(capsys, "report", str(tmp_path / "nothing"))
    assert code == 2 and "nothing" in err


def test_sweep_on_a_folder_in_use_is_refused_with_the_holder(capsys, tmp_path):
    import threading

    from chimera.bench.lock import folder_lock

    suite = tmp_path / "s.toml"
    suite.write_text('task = "digits"\nmodel = "mlp"\noptimizer = "adamw"\nepochs = 1\n')
    out = tmp_path / "runs"
    held, release = threading.Event(), threading.Event()

    def hold():
        with folder_lock(out):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        held.wait(30)
        code, _, err = run_cli(capsys, "sweep", str(suite), "--out", str(out), "--quiet")
    finally:
        release.set()
        holder.join()
    assert code == 2 and err.count("\n") == 1
    assert f"in use by pid {os.getpid()}" in err and "--wait" in err


def test_train_batch_limits_and_the_default_controller(capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    code, _, _ = run_cli(capsys, *TRAIN, "--out", str(out), "--quantizer", "chimera",
                         "--max-batches", "2", "--eval-max-batches", "none", "--log-every", "1")
    assert code == 0
    final = read_records(out, "final")[0]
    assert final["steps"] == 2 and final["max_batches"] == 2
    assert final["eval_max_batches"] is None and final["controller"] is None
    assert "controller_alpha" in read_records(out, "step")[0]  # chimera's default controller
    off = tmp_path / "off.jsonl"
    code, _, _ = run_cli(capsys, *TRAIN, "--out", str(off), "--quantizer", "chimera",
                         "--max-batches", "2", "--log-every", "1", "--no-controller")
    assert code == 0
    assert read_records(off, "final")[0]["controller"] is False
    assert "controller_alpha" not in read_records(off, "step")[0]
