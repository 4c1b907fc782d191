import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chimera.models.cnn import CNN1d
from chimera.models.mlp import MLP
from chimera.nn.bit_layers import BitConv1d, BitLayer, BitLinear
from chimera.nn.quantize import QUANTIZERS, FloatConfig, ternarize

TERNARY = [n for n in QUANTIZERS.names() if n != "fp32"]

MODES = ["strict_bitnet", "chimera"]


def mlp():
    torch.manual_seed(0)
    return MLP((12,), 5, hidden=8, depth=3)  # Flatten, 4 Linear layers named 1, 3, 5, 7


def layer_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.Linear | BitLayer)]


def assert_every_parameter_gets_gradient(model, x, num_classes):
    loss = F.cross_entropy(model(x), torch.arange(len(x)) % num_classes)
    loss.backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []


def test_registered_modes():
    assert {"strict_bitnet", "chimera"} <= set(TERNARY)


@pytest.mark.parametrize("mode", MODES)
def test_ternarize_keeps_latent_weights_and_applies_quant_kwargs(mode):
    model = mlp()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ternarize(model, mode, skip=(), alpha_target=0.4, warmup_steps=3) is model
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 4
    assert all(m.quant_mode == mode and m.alpha_target == 0.4 and m.warmup_steps == 3
               for m in layers)
    for name in ("1", "3", "5", "7"):
        layer = model.get_submodule(name)
        assert torch.equal(layer.weight_master, original[f"{name}.weight"])
        assert torch.equal(layer.bias, original[f"{name}.bias"])
        assert layer.scale_ema.item() == pytest.approx(original[f"{name}.weight"].abs().mean())


def test_skip_rules():
    default = ternarize(mlp(), "chimera")
    assert layer_types(default) == [nn.Linear, BitLinear, BitLinear, nn.Linear]
    first = ternarize(mlp(), "chimera", skip=("first",))
    assert layer_types(first) == [nn.Linear, BitLinear, BitLinear, BitLinear]
    last = ternarize(mlp(), "chimera", skip=["last"])
    assert layer_types(last) == [BitLinear, BitLinear, BitLinear, nn.Linear]
    named = ternarize(mlp(), "chimera", skip=("3", "last"))
    assert layer_types(named) == [BitLinear, nn.Linear, BitLinear, nn.Linear]
    assert layer_types(ternarize(mlp(), "chimera", skip="5")) == [BitLinear] * 2 + [
        nn.Linear, BitLinear]


def test_qualified_names_in_nested_models():
    model = CNN1d((40,), 4, channels=3)  # features.0, features.2, features.4 (Conv1d), head
    ternarize(model, "strict_bitnet", skip=("features.2",))
    types = [type(model.features[i]) for i in (0, 2, 4)] + [type(model.head)]
    assert types == [BitConv1d, nn.Conv1d, BitConv1d, BitLinear]


def test_unknown_skip_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"\['1', '3', '5', '7'\]"):
        ternarize(mlp(), "chimera", skip=("9",))


def test_fp32_is_a_no_op_and_unknown_modes_raise():
    model = mlp()
    before = [type(m) for m in model.modules()]
    assert ternarize(model, "fp32") is model
    assert ternarize(model, "fp32", skip=[]) is model  # an empty skip is the no-op it is
    with pytest.raises(ValueError, match="'fp32' converts no layer"):
        FloatConfig(skip="first")
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(ValueError, match="chimera"):  # the registry lists the known modes
        ternarize(model, "binary")
    with pytest.raises(ValueError, match="quant_mode"):
        ternarize(model, "chimera", quant_mode="strict_bitnet")


def test_shared_layers_stay_shared_and_a_bare_layer_is_returned_converted():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    ternarize(model, "chimera", skip=())
    assert isinstance(model[0], BitLinear) and model[0] is model[2]
    bare = nn.Linear(3, 2)
    assert isinstance(ternarize(bare, "chimera", skip=()), BitLinear)


@pytest.mark.parametrize("name", TERNARY)
def test_a_config_that_converts_nothing_is_an_error(name):
    # the only layer is both first and last: the model would stay float under a ternary name
    bare = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=rf"^quantizer '{name}' would convert no layer: skip "
                       r"\['first', 'last'\] keeps all of the model's convertible layers "
                       r"\['\(the model itself\)'\] in float"):
        ternarize(bare, name)
    two = MLP((12,), 5, hidden=8, depth=1)  # Linear layers 1 and 3: first and last
    with pytest.raises(ValueError, match=r"convertible layers \['1', '3'\].*skip=\[\]"):
        ternarize(two, name)
    with pytest.raises(ValueError, match=r"convertible layers \['1', '3'\]"):
        ternarize(two, name, skip=("first", "3"))
    assert layer_types(two) == [nn.Linear, nn.Linear]  # nothing half-converted
    converted = ternarize(two, name, skip=("last",))
    assert type(converted[1]) is not nn.Linear and type(converted[3]) is nn.Linear


def test_subclasses_are_left_alone_and_a_model_with_nothing_convertible_is_an_error():
    attention = nn.MultiheadAttention(8, 2)  # out_proj is a subclass of nn.Linear
    with pytest.raises(ValueError, match="the model has no nn.Linear, nn.Conv1d or nn.Conv2d"):
        ternarize(attention, "chimera", skip=())
    assert type(attention.out_proj) is not BitLinear
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    ternarize(model, "chimera", skip=())
    assert type(model[0]) is BitLinear and type(model[1].out_proj) is not BitLinear


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("skip", [(), ("first", "last")])
def test_every_parameter_of_a_ternary_mlp_gets_gradient(mode, skip):
    model = ternarize(mlp(), mode, skip=skip)
    assert_every_parameter_gets_gradient(model, torch.randn(6, 12), 5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("skip", [(), ("first", "last")])
def test_every_parameter_of_a_ternary_cnn1d_gets_gradient(mode, skip):
    torch.manual_seed(1)
    model = ternarize(CNN1d((40,), 10, channels=8), mode, skip=skip)
    assert sum(isinstance(m, BitConv1d) for m in model.modules()) == (3 if skip == () else 2)
    assert_every_parameter_gets_gradient(model, torch.randn(6, 40), 10)


@pytest.mark.parametrize("name", QUANTIZERS.names())
def test_every_config_round_trips_through_a_plain_dict(name):
    from chimera.nn.quantize import quantizer_config

    skip = () if name == "fp32" else ("last",)  # fp32 converts nothing: its skip is empty
    config = quantizer_config(name, skip=list(skip))
    data = config.to_dict()
    assert data["quantizer"] == name and data["skip"] == skip
    assert quantizer_config(**data) == config
    assert quantizer_config(**quantizer_config(name).to_dict()) == quantizer_config(name)


@pytest.mark.parametrize(("name", "hparams", "message"), [
    ("chimera", {"alpha_target": -0.1}, "alpha_target"),
    ("chimera", {"stat_mode": "mode"}, "stat_mode"),
    ("strict_bitnet", {"group_size": 8},
     "quantizer 'strict_bitnet' has no hyper-parameter 'group_size'"),
    ("int_ternary", {"group_size": 0}, "group_size"),
    ("int_ternary", {"alpha_target": 0.5}, "allowed: skip, group_size, act_quant"),
    ("fp32", {"alpha_target": 0.5},
     r"^quantizer 'fp32' converts no layer and takes no hyper-parameters, got "
     r"\{'alpha_target': 0.5\}$"),
    ("fp32", {"skip": ["first"]}, r"^quantizer 'fp32' converts no layer and takes no "
                                  r"hyper-parameters, got \{'skip': \['first'\]\}$"),
    ("chimera", {"skip": [1]}, "skip must be a layer name"),
    ("chimera", {"skip": ["first", "first"]},
     r"^skip must be distinct layer names, got \('first', 'first'\)$"),
])
def test_configs_validate_themselves_when_built(name, hparams, message):
    from chimera.nn.quantize import quantizer_config

    with pytest.raises(ValueError, match=message):
        quantizer_config(name, **hparams)


def test_quantize_takes_a_config_and_ternarize_is_its_one_line_form():
    from chimera.nn.quantize import TernaryConfig, quantize_

    a = quantize_(mlp(), TernaryConfig(quantizer="strict_bitnet", alpha_target=0.4))
    b = ternarize(mlp(), "strict_bitnet", alpha_target=0.4)
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="config must be a quantizer config"):
        quantize_(mlp(), "chimera")


def float_cnn():
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 8),
                         nn.ReLU(), nn.Linear(8, 3))


def test_a_float_checkpoint_loads_strictly_into_a_ternarized_model():
    """``ternarized.load_state_dict(float_model.state_dict())`` gives the state of converting
    that float model: weight -> weight_master, scale_ema from it, warm-up from step 0, the
    layer's own alpha settings."""
    pretrained = float_cnn()
    expected = ternarize(float_cnn(), "chimera", skip=("last",), alpha_target=0.4)
    torch.manual_seed(6)  # other random weights, then some training steps
    target = ternarize(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)),
                       "chimera", skip=("last",), alpha_target=0.4)
    for _ in range(3):
        target(torch.randn(2, 2, 5, 5))
    target[0].alpha_override = 0.9
    result = target.load_state_dict(pretrained.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    got, want = target.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]) or key == "0._extra_state", key
    assert int(target[0].forward_step) == 0 and target[0].alpha_override == 0.9  # kept
    target[0].alpha_override = None
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(target(x), expected(x))


def test_float_checkpoint_details():
    bf16 = {k: v.to(torch.bfloat16) for k, v in nn.Linear(4, 3).state_dict().items()}
    layer = BitLinear(4, 3, stat_mode="median")
    layer.load_state_dict(bf16)
    assert layer.weight_master.dtype == torch.float32
    assert layer.scale_ema == bf16["weight"].float().abs().median()
    with_scale = {**nn.Linear(4, 3).state_dict(), "scale_ema": torch.tensor(0.125)}
    layer.load_state_dict(with_scale, strict=False)  # a given scale_ema is kept
    assert layer.scale_ema.item() == 0.125
    twin = BitLinear(4, 3)
    twin.load_state_dict(layer.state_dict())  # a Bit layer's own checkpoint is untouched
    assert torch.equal(twin.weight_master, layer.weight_master) and twin.scale_ema == 0.125
    with pytest.raises(RuntimeError, match="size mismatch for weight_master"):
        BitLinear(5, 3).load_state_dict(nn.Linear(4, 3).state_dict())


class TiedMLM(nn.Module):
    """An MLM head whose decoder shares the embedding's weight and its parent's bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.embeddings = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.decoder = nn.Linear(6, 10)
        self.bias = nn.Parameter(torch.zeros(10))
        self.decoder.weight = self.embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, ids):
        return self.decoder(torch.relu(self.body(self.embeddings(ids))))


def test_tied_weights_stay_tied_in_bit_layers():
    model = ternarize(TiedMLM(), "chimera", skip=())
    assert isinstance(model.decoder, BitLinear)
    assert model.decoder.weight_master is model.embeddings.weight
    assert model.decoder.bias is model.bias
    assert model.decoder.scale_ema.item() == pytest.approx(
        model.embeddings.weight.abs().mean().item())
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.embeddings.weight.grad.abs().sum() > 0  # one gradient from both uses
    assert len(list(model.parameters())) == 4  # embeddings, body weight and bias, tied bias
    fresh = ternarize(TiedMLM(), "chimera", skip=())
    fresh.load_state_dict(TiedMLM().state_dict())  # a float checkpoint with tied keys
    assert fresh.decoder.weight_master is fresh.embeddings.weight


def test_schemes_without_float_weights_refuse_a_tied_layer():
    model = TiedMLM()
    with pytest.raises(ValueError, match=r"^layer 'decoder' cannot be converted by quantizer "
                       r"'int_ternary': its weight is tied to \['embeddings.weight'\].*"
                       r"skip=\['decoder'\]$"):
        ternarize(model, "int_ternary", skip=())
    assert type(model.body) is nn.Linear  # nothing was converted
    converted = ternarize(TiedMLM(), "int_ternary", skip=["decoder"])
    assert type(converted.decoder) is nn.Linear
