import pytest

from chimera.data import load_task
from chimera.nn.bit_layers import BitLayer
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec
from chimera.run.trainer import train


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def spec(**kw):
    base = dict(task="digits", model="mlp", optimizer="adamw", epochs=2, batch_size=64,
                optimizer_hparams={"lr": 1e-2}, log_every=5)
    return RunSpec(**{**base, **kw})


@pytest.mark.parametrize("mode", ["strict_bitnet", "chimera"])
def test_ternary_runs_log_model_level_stats(mode, digits, tmp_path):
    with RecordWriter(tmp_path / "r.jsonl") as w:
        final = train(spec(quantizer=mode), w, data=digits, progress=False)
    assert final["quant_num_ternary_layers"] == 1  # mlp: 3 linears, first and last kept fp32
    total = (final["quant_global_zero_ratio"] + final["quant_global_plus_ratio"]
             + final["quant_global_minus_ratio"])
    assert total == pytest.approx(1.0)
    assert 0 < final["quant_global_effective_bits"] <= 1.585
    steps = read_records(tmp_path / "r.jsonl", record_type="step")
    assert all("quant_global_zero_ratio" in r for r in steps)
    assert final["test_accuracy"] > 0.5


@pytest.mark.parametrize("frequency", ["batch", "epoch"])
def test_controller_moves_alpha_toward_the_target_zero_ratio(frequency, digits, tmp_path):
    # start far below the target zero ratio (alpha 0 keeps almost every weight): alpha must rise
    ctrl = {"target_bits": 1.32, "frequency": frequency, "step_size": 0.05}
    with RecordWriter(tmp_path / "r.jsonl") as w:
        train(spec(quantizer="chimera", quant_hparams={"alpha_target": 0.0, "warmup_steps": 0},
                   controller=ctrl), w, data=digits, progress=False)
    epochs = read_records(tmp_path / "r.jsonl", record_type="epoch")
    assert epochs[-1]["controller_target_zero_ratio"] == pytest.approx(0.63038, abs=1e-4)
    if frequency == "epoch":  # two updates, both below the band: +0.05 each
        assert epochs[-1]["controller_alpha"] == pytest.approx(0.1)
        assert epochs[-1]["controller_error"] < -0.02
    else:  # 46 updates: enough to reach the band around the target and stay near it
        assert epochs[-1]["controller_alpha"] > 0.5
        assert abs(epochs[-1]["quant_global_zero_ratio"] - 0.63038) < 0.06


def test_controller_override_reaches_the_layers(digits):
    from chimera.models import build_model
    from chimera.nn.quantize import AlphaControl, ternarize

    model = ternarize(build_model("mlp", (64,), 10), "chimera", skip=())
    control = AlphaControl(model, {"affects": "alpha_override", "step_size": 0.1})
    model(digits.x_train[:32])
    control.update()
    layers = [m for m in model.modules() if isinstance(m, BitLayer)]
    assert len(layers) == 3
    assert all(m.alpha_override == pytest.approx(control.alpha) for m in layers)


@pytest.mark.parametrize(("kw", "message"), [
    ({"quantizer": "ternary9"}, "unknown quantizer 'ternary9'"),
    ({"quantizer": "int_ternary"}, "trained by optimizer 'scaled_optum'"),
    ({"quantizer": "chimera", "controller": {"frequency": "hourly"}}, "controller frequency"),
    ({"quantizer": "chimera", "controller": {"affects": "gamma"}}, "controller affects"),
    ({"quantizer": "chimera", "controller": {"target": 1.3}},
     "^controller has no setting 'target'; allowed: frequency, affects, target_bits, branch"),
    ({"quantizer": "chimera", "controller": {"step_size": 0}}, "^step_size must be a number > 0"),
    ({"controller": {}}, r"^a controller needs a quantizer with BitLinear/BitConv layers "
                         r"\(strict_bitnet or chimera\), got quantizer 'fp32'$"),
    ({"quantizer": "int_ternary", "optimizer": "scaled_optum", "controller": {}},
     "got quantizer 'int_ternary'$"),
    ({"quantizer": "chimera", "quant_hparams": {"skip": ["fc9"]}}, "skip names"),
    ({"quantizer": "fp32", "quant_hparams": {"skip": ["first"]}}, "'fp32' converts no layer"),
])
def test_bad_quantizer_configs_are_clear_errors_when_the_spec_is_built(kw, message, digits):
    with pytest.raises(ValueError, match=message):
        train(spec(**kw), data=digits, progress=False)


def test_controller_settings_and_the_layers_it_needs():
    from torch import nn

    from chimera.nn.quantize import AlphaControl, controllable_quantizers, controller_settings

    assert controllable_quantizers() == ["strict_bitnet", "chimera"]
    frequency, affects, control = controller_settings({"frequency": "batch", "target_bits": 1.0})
    assert (frequency, affects, control.target_bits) == ("batch", "alpha_target", 1.0)
    with pytest.raises(ValueError, match="^controller must be a table"):
        controller_settings([("target_bits", 1.0)])
    with pytest.raises(ValueError, match=r"needs a model with BitLinear/BitConv layers "
                                         r"\(quantizer strict_bitnet or chimera\)"):
        AlphaControl(nn.Sequential(nn.Linear(2, 2)), {})


def test_int_ternary_run_reports_integer_state_per_weight(digits):
    final = train(spec(quantizer="int_ternary", optimizer="scaled_optum"), data=digits,
                  progress=False)
    assert final["ternary_state_bytes_per_weight"] <= 2.0
    assert final["test_accuracy"] > 0.5
    assert final["quant_num_ternary_layers"] == 1


@pytest.mark.parametrize("mode", ["fp32", "strict_bitnet", "chimera", "int_ternary"])
def test_resnet20_loss_falls_in_every_mode_on_digits_images(mode, tmp_path):
    opt = "scaled_optum" if mode == "int_ternary" else "adamw"
    s = RunSpec("digits_2d", "resnet20", opt, epochs=1, batch_size=128, quantizer=mode,
                optimizer_hparams={"lr": 1e-2}, log_every=1)
    with RecordWriter(tmp_path / "r.jsonl") as w:
        train(s, w, data=load_task("digits_2d"), progress=False)
    losses = [r["loss"] for r in read_records(tmp_path / "r.jsonl", record_type="step")]
    assert sum(losses[-3:]) < sum(losses[:3])
    model_layers = read_records(tmp_path / "r.jsonl", record_type="final")[0]
    if mode != "fp32":
        assert model_layers["quant_num_ternary_layers"] == 20  # 21 conv + fc, first/last fp32
