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
    (["--lr", "-1"], "learning rate"),
    (["--opt-arg", "betas"], "--opt-arg must look like KEY=VALUE"),
    (["--opt-arg", "momentum=0.9", "--optimizer", "adamw"], "no hyper-parameter 'momentum'"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--model-arg", "hidden=0"], "hidden"),
])
def test_bad_input_gives_a_one_line_error(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *TRAIN, "--out", str(tmp_path / "r.jsonl"), *argv)
    assert code == 2
    assert err.startswith("chimera: error: ") and message in err
    assert err.count("\n") == 1


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
    assert parse_kv(["lr=0.1", "betas=[0.9,0.99]", "mode=fast"], "x") == {
        "lr": 0.1, "betas": (0.9, 0.99), "mode": "fast"}


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
