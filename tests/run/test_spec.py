"""RunSpec validates itself when built (one ``ValueError`` line, before anything runs), and
``probe_run`` catches what only building the run's objects reveals."""

import dataclasses
import math

import pytest
import torch

from chimera.data import load_task
from chimera.run.build import probe_run
from chimera.run.spec import RunSpec, check_optimizer_hparams, check_plain_table

BASE = dict(task="digits", model="mlp", optimizer="adamw")


def one_line_error(message, **fields):
    with pytest.raises(ValueError, match=message) as error:
        RunSpec(**{**BASE, **fields})
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize(("fields", "message"), [
    # arguments that do not apply
    ({"rule_hparams": {"K": 2}}, r"^rule 'backprop' takes no rule_hparams, got \{'K': 2\}$"),
    ({"model": "resmlp", "rule": "dfa", "rule_hparams": {"K": 2}},
     r"^rule 'dfa' has no hyper-parameter 'K'; allowed: "),
    ({"controller": {"target_bits": 1.32}},
     r"^a controller needs a quantizer with BitLinear/BitConv layers \(strict_bitnet or "
     r"chimera\), got quantizer 'fp32'$"),
    ({"optimizer": "scaled_optum", "quantizer": "int_ternary", "controller": {}},
     "got quantizer 'int_ternary'$"),
    ({"quant_hparams": {"skip": ["first"]}},
     r"^quantizer 'fp32' converts no layer and takes no hyper-parameters, got "
     r"\{'skip': \['first'\]\}$"),
    ({"quant_hparams": {"warmup_steps": 3}}, "^quantizer 'fp32' converts no layer"),
    ({"quantizer": "chimera", "controller": {"frequency": "batch", "gain": 2}},
     "^controller has no setting 'gain'; allowed: frequency, affects, target_bits"),
    ({"optimizer_hparams": {"momentum": 0.9}},
     "^optimizer 'adamw' has no hyper-parameter 'momentum'; allowed: lr, betas"),
    # names
    ({"task": "imagenet"}, "^unknown task 'imagenet'; known: "),
    ({"model": "vit"}, "^unknown model 'vit'; known: "),
    ({"optimizer": "adamx"}, "^unknown optimizer 'adamx'; known: "),
    ({"rule": "hebb"}, "^unknown learning rule 'hebb'; known: "),
    # plain, finite tables
    ({"optimizer_hparams": {"lr": math.inf}},
     "^optimizer_hparams.lr must be a finite number, got inf$"),
    ({"model_hparams": {"hidden": [4, math.nan]}},
     "^model_hparams.hidden.1 must be a finite number, got nan$"),
    ({"quantizer": "chimera", "controller": {"target_bits": -math.inf}},
     "^controller.target_bits must be a finite number, got -inf$"),
    ({"rule_hparams": {"K": object()}}, "^rule_hparams.K must be plain data"),
    ({"optimizer_hparams": {1: 0.1}}, "^optimizer_hparams key must be a string, got 1$"),
    ({"optimizer_hparams": [("lr", 0.1)]}, "^optimizer_hparams must be a table of "),
    # types against the optimizer's signature (strict: no string for a number, no 1 for True)
    ({"optimizer_hparams": {"weight_decay": "abc"}},
     "^optimizer 'adamw' hyper-parameter weight_decay must be of type float, got 'abc'$"),
    ({"optimizer_hparams": {"lr": "0.01"}},
     r"^optimizer 'adamw' hyper-parameter lr must be of type float \| Tensor, got '0.01'$"),
    ({"optimizer_hparams": {"amsgrad": 1}}, "hyper-parameter amsgrad must be of type bool"),
    ({"optimizer_hparams": {"betas": [0.9]}}, r"hyper-parameter betas must be of type tuple\["),
    ({"optimizer": "stac", "optimizer_hparams": {"last_n_layers": 1.0}},
     "^optimizer 'stac' hyper-parameter last_n_layers must be of type int, got 1.0$"),
])
def test_bad_and_inapplicable_settings_are_one_line_errors(fields, message):
    one_line_error(message, **fields)


def test_every_caller_gets_the_checks_replace_and_rebuilt_specs_included():
    spec = RunSpec(**BASE, quantizer="chimera", controller={"target_bits": 1.32})
    with pytest.raises(ValueError, match="got quantizer 'fp32'"):
        dataclasses.replace(spec, quantizer="fp32")
    with pytest.raises(ValueError, match="takes no rule_hparams"):
        RunSpec(**{**spec.to_dict(), "rule_hparams": {"K": 4}})


def test_valid_settings_pass_and_keep_their_run_ids():
    assert RunSpec("digits", "mlp", "adamw").run_id == "digits-mlp-adamw-000ac75b-s0"
    spec = RunSpec(**BASE, optimizer_hparams={"lr": 1e-2, "betas": [0.9, 0.99], "amsgrad": True,
                                              "weight_decay": 0, "foreach": None},
                   quant_hparams={"skip": []})
    assert spec.quant_config.skip == ()
    RunSpec(**BASE, quantizer="chimera", controller={"frequency": "batch", "target_bits": 1.0})
    RunSpec(**{**BASE, "model": "resmlp"}, rule="state_bridge", rule_hparams={"K": 2})
    RunSpec(**{**BASE, "optimizer": "stac"}, optimizer_hparams={"trunk_lr": None, "lr": 1})


def test_shared_checks():
    check_plain_table("t", {"a": [1, "x", None, True, {"b": 2.5}]})
    with pytest.raises(ValueError, match=r"^t.a.0.b must be a finite number, got nan$"):
        check_plain_table("t", {"a": [{"b": math.nan}]})
    check_optimizer_hparams("sgd", {"lr": 0.1, "momentum": 0, "nesterov": False})
    with pytest.raises(ValueError, match="^optimizer 'sgd' hyper-parameter nesterov must be of "
                                         "type bool, got 'yes'$"):
        check_optimizer_hparams("sgd", {"nesterov": "yes"})


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


@pytest.mark.parametrize(("fields", "message"), [
    ({"optimizer_hparams": {"lr": 1e300}},
     r"^a step of optimizer 'adamw' with \{'lr': 1e\+300\}: .*overflow"),
    ({"model": "resnet20"}, "input_shape must be"),
    ({"model": "mlp", "model_hparams": {"depth": 1}, "quantizer": "chimera"},
     r"^quantizer 'chimera' would convert no layer: skip \['first', 'last'\] keeps all of the "
     r"model's convertible layers \['1', '3'\] in float"),
    ({"model": "resmlp", "rule": "state_bridge", "rule_hparams": {"K": 0}},
     "K must be an integer >= 1, got 0"),
    ({"model": "mlp", "rule": "state_bridge"}, "needs a residual model"),
])
def test_probe_run_finds_what_only_building_reveals(fields, message, digits):
    spec = RunSpec(**{**BASE, **fields})
    with pytest.raises(ValueError, match=message) as error:
        probe_run(spec, digits)
    assert "\n" not in str(error.value)


def test_specs_and_probes_leave_the_rng_and_the_data_alone(digits):
    x = digits.x_train.clone()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    spec = RunSpec(**BASE, quantizer="chimera", controller={"target_bits": 1.32})
    probe_run(spec, digits)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(digits.x_train, x)


def test_act_ste_passes_through_the_quantizer_options():
    """``act_ste`` (TernaryConfig): the spec passes quantizer arguments through unchanged, so
    runs, suites and ``chimera train --quant-arg act_ste=false`` reach the Bit layers."""
    from chimera.bench.suite.schema import load_suite
    from chimera.cli import build_parser, spec_from_args
    from chimera.nn.bit_layers import BitLayer
    from chimera.run.build import build_run_model

    spec = RunSpec("digits", "mlp", "adamw", quantizer="chimera", quant_hparams={"act_ste": False})
    assert spec.quant_config.act_ste is False
    assert spec.quant_config.to_dict()["act_ste"] is False
    layers = [m for m in build_run_model(spec, (64,), 10).modules() if isinstance(m, BitLayer)]
    assert layers and all(m.act_ste is False for m in layers)
    assert RunSpec("digits", "mlp", "adamw", quantizer="chimera").quant_config.act_ste is True
    assert spec.run_id != RunSpec("digits", "mlp", "adamw", quantizer="chimera").run_id
    with pytest.raises(ValueError, match="act_ste"):
        RunSpec("digits", "mlp", "adamw", quantizer="chimera", quant_hparams={"act_ste": "no"})
    args = build_parser().parse_args(["train", "--quantizer", "strict_bitnet", "--quant-arg",
                                      "act_ste=false"])
    assert spec_from_args(args, 0).quant_config.act_ste is False
    suite = load_suite({"task": "digits", "model": "mlp", "optimizer": "adamw",
                        "quantizer": "chimera", "quant_hparams": {"act_ste": False}})
    assert suite.specs[0].quant_config.act_ste is False
