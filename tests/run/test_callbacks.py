"""The final record carries the resolved settings of the run's optimizer and learning rule
(defaults included), as it carries the quantizer's."""

import json

import pytest
import torch
from torch import nn

from chimera.data import load_task
from chimera.optim import build_optimizer
from chimera.run.build import lr_scheduler
from chimera.run.callbacks import OptimizerMetrics, optimizer_config, plain
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec
from chimera.run.trainer import train


def mlp():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_optimizer_config_is_the_resolved_defaults_as_plain_data():
    config = optimizer_config(build_optimizer("adamw", mlp(), lr=0.02))
    assert config["lr"] == 0.02 and config["weight_decay"] == 0.01  # given, and torch's default
    assert config["betas"] == [0.9, 0.999] and config["amsgrad"] is False
    assert "params" not in config and "param_groups" not in config  # one group, the defaults
    assert json.loads(json.dumps(config)) == config
    tensor_lr = optimizer_config(torch.optim.SGD(mlp().parameters(), lr=torch.tensor(0.5)))
    assert tensor_lr["lr"] == 0.5 and isinstance(tensor_lr["lr"], float)


def test_stac_records_the_settings_of_its_trunk_and_cap():
    config = optimizer_config(build_optimizer("stac", mlp(), lr=0.01, cap_weight_decay=0.1))
    trunk, cap = config["param_groups"]
    assert (trunk["stac_role"], trunk["lr"], trunk["weight_decay"]) == ("trunk", 0.0075, 0.0)
    assert (cap["stac_role"], cap["lr"], cap["weight_decay"]) == ("cap", 0.01, 0.1)
    assert trunk["layer_names"] == ["0", "2"] and cap["layer_names"] == ["4"]
    assert "betas" not in trunk  # the same in every group: only in the defaults
    assert config["lr"] == 0.01 and config["trunk_momentum"] == 0.9


def test_the_config_is_taken_before_the_schedule_moves_the_learning_rate():
    opt = build_optimizer("adamw", mlp(), lr=0.1)
    scheduler = lr_scheduler(opt, "cosine", total_steps=4)  # adds initial_lr to the groups
    metrics = OptimizerMetrics(opt)
    for _ in range(3):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] < 0.1
    assert metrics.final_fields()["optimizer_config"]["lr"] == 0.1
    assert "param_groups" not in metrics.final_fields()["optimizer_config"]


def test_plain():
    assert plain({"a": (1, torch.tensor(2.5)), 3: torch.float32, "b": None}) == {
        "a": [1, 2.5], "3": "torch.float32", "b": None}


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def test_final_records_carry_the_optimizer_and_rule_configs(digits, tmp_path):
    spec = RunSpec("digits", "resmlp", "stac", epochs=1, batch_size=256, rule="state_bridge",
                   model_hparams={"d_hidden": 16, "num_blocks": 1},
                   optimizer_hparams={"lr": 1e-3}, rule_hparams={"K": 2},
                   lr_schedule="cosine")
    with RecordWriter(tmp_path / "r.jsonl") as writer:
        final = train(spec, writer, data=digits, progress=False)
    (record,) = read_records(tmp_path / "r.jsonl", record_type="final")
    for fields in (final, record):
        assert fields["optimizer_config"]["lr"] == 1e-3
        assert [g["stac_role"] for g in fields["optimizer_config"]["param_groups"]] == [
            "trunk", "cap"]
        rule = fields["rule_config"]
        assert rule["K"] == 2  # given
        assert rule["sigma_bridge"] == 0.05  # the preset's; no DFA warm-up for the state bridge
        assert rule["warmup_frac"] == 0.0
    backprop = train(RunSpec("digits", "mlp", "adamw", epochs=1, batch_size=256),
                     data=digits, progress=False)
    assert backprop["optimizer_config"]["weight_decay"] == 0.01
    assert "rule_config" not in backprop  # backprop runs inline: no rule object, no settings
