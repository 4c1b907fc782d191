import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from chimera.data import load_task
from chimera.deploy.export import export_ternary, load_ternary, read_ternary
from chimera.deploy.packed import PackedTernaryLinear, PackedTernaryModule
from chimera.models.resnet import ChimeraResNet20
from chimera.nn.bit_layers import BitLayer, BitLinear
from chimera.nn.int_ternary import IntTernaryModule
from chimera.nn.quantize import ternarize
from chimera.optim.scaled_optum import ScaledOptum
from chimera.run.build import build_run_model
from chimera.run.checkpoint import load_checkpoint
from chimera.run.export_run import export_checkpoint, load_exported_run
from chimera.run.spec import RunSpec
from chimera.run.trainer import train

FORMATS = ("base3", "2bit")
PER_BYTE = {"base3": 5, "2bit": 4}


def recipe(spec: RunSpec, input_shape, num_classes=10) -> dict:
    return {"spec": spec.to_dict(), "input_shape": list(input_shape), "num_classes": num_classes}


def train_steps(model: nn.Module, x, steps: int = 3) -> nn.Module:
    """A few AdamW steps (ScaledOptum for integer-ternary layers) on random labels."""
    int_layers = [m for m in model.modules() if isinstance(m, IntTernaryModule)]
    if int_layers:
        opt = ScaledOptum(model.parameters(), lr=0.01, threshold=1, e_policy="track")
        opt.add_ternary_modules(int_layers)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    y = torch.randint(0, 10, (len(x),))
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def exact(model: nn.Module, value: bool = True) -> nn.Module:
    """``model`` with every packed layer's ``exact`` set to ``value``."""
    for m in model.modules():
        if isinstance(m, PackedTernaryModule):
            m.exact = value
    return model


def mixed_int_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    return ternarize(model, "int_ternary", skip=())


MLP_RUN = RunSpec(task="digits", model="mlp", optimizer="adamw", quantizer="chimera")
CNN_RUN = RunSpec(task="mnist1d", model="cnn", optimizer="adamw", quantizer="strict_bitnet",
                   quant_hparams={"skip": [], "act_quant": "per_token", "stat_mode": "median",
                                  "ste_clip": 0.5})
# fan-ins 5, 75 and 125: every row of every layer ends in a partial group of 32
INT_RUN = RunSpec(task="mnist1d", model="cnn", optimizer="scaled_optum", quantizer="int_ternary",
                   quant_hparams={"skip": []})

# name -> (trained-model factory, input shape, recipe or None, skeleton factory or None)
CASES = {
    "mlp": (lambda: build_run_model(MLP_RUN, (64,), 10), (64,), recipe(MLP_RUN, (64,)), None),
    "cnn": (lambda: build_run_model(CNN_RUN, (40,), 10), (40,), recipe(CNN_RUN, (40,)), None),
    "resnet20": (lambda: ChimeraResNet20(mode="chimera"), (3, 8, 8), None,
                 lambda: ChimeraResNet20(mode="chimera")),
    "int_cnn": (lambda: build_run_model(INT_RUN, (40,), 10), (40,), recipe(INT_RUN, (40,)),
                None),
    "int_conv2d": (mixed_int_model, (3, 6, 6), None, mixed_int_model),
}


def ternary_sizes(model):
    return [m.T.numel() if isinstance(m, IntTernaryModule) else m.weight_master.numel()
            for m in model.modules() if isinstance(m, BitLayer | IntTernaryModule)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_loaded_model_reproduces_eval_outputs_exactly(case, fmt, tmp_path):
    make, shape, meta, skeleton = CASES[case]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(6, *shape)
    train_steps(model, x)
    with torch.no_grad():
        expected = model(x)
    sizes = ternary_sizes(model)
    path = tmp_path / "model.safetensors"
    report = export_ternary(model, path, metadata=meta, format=fmt)
    loaded = load_exported_run(path) if skeleton is None else load_ternary(path, skeleton())
    assert not loaded.training
    assert not any(isinstance(m, BitLayer | IntTernaryModule) for m in loaded.modules())
    fast = loaded(x)  # default: integer kernel in the linear layers (CPU)
    assert torch.allclose(fast, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(exact(loaded)(x), expected)
    assert torch.equal(exact(loaded, False)(x), fast)
    assert torch.equal(model(x), expected)  # eval forwards mutate nothing
    # sizes: one packed byte per 5 (base3) / 4 (2bit) weights, the last byte of a layer partial
    assert report["ternary_layers"] == len(sizes)
    assert report["ternary_weights"] == sum(sizes)
    assert report["packed_bytes"] == sum(math.ceil(n / PER_BYTE[fmt]) for n in sizes)
    nominal = 8 / PER_BYTE[fmt]
    assert nominal <= report["bits_per_weight"] <= nominal + 8 * len(sizes) / sum(sizes)
    assert report["file_bytes"] == path.stat().st_size
    assert report["compression"] == report["state_dict_bytes"] / report["file_bytes"]


def test_base3_is_1_6_bits_per_weight_and_beats_the_fp32_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ternarize(nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 20)), "chimera", skip=())
    report = export_ternary(model, tmp_path / "m.safetensors")
    assert report["bits_per_weight"] == 1.6 and report["packed_bytes"] == 6000 // 5
    assert report["file_bytes"] < report["state_dict_bytes"] / 10


def test_file_layout_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = build_run_model(MLP_RUN, (64,), 10)  # layers 0 and 2 fp32, layer 1 ternary
    path = tmp_path / "m.safetensors"
    export_ternary(model, path, metadata={**recipe(MLP_RUN, (64,)), "note": "hi"})
    tensors, meta = read_ternary(path)
    assert set(tensors) == {"1.weight", "1.bias", "3.T.data", "3.T.shape", "3.T.format",
                            "3.scale", "3.bias", "5.weight", "5.bias"}
    assert tensors["3.T.data"].dtype == torch.uint8 and tensors["3.T.data"].numel() == 2000
    assert tensors["3.scale"].dim() == 0
    assert meta["spec"] == MLP_RUN.to_dict() and meta["note"] == "hi"
    assert meta["layers"]["3"]["kind"] == "linear"
    assert meta["layers"]["3"]["config"]["in_features"] == 100
    with safe_open(path, framework="pt") as f:  # plain str -> str metadata, JSON values
        assert json.loads(f.metadata()["input_shape"]) == [64]


def test_end_to_end_train_checkpoint_export_load(tmp_path):
    spec = RunSpec(task="digits", model="mlp", optimizer="adamw", epochs=1, quantizer="chimera",
                   optimizer_hparams={"lr": 1e-2})
    data = load_task("digits")
    ckpt_path, out = tmp_path / "run.pt", tmp_path / "run.safetensors"
    train(spec, data=data, progress=False, checkpoint=str(ckpt_path))
    report = export_checkpoint(ckpt_path, out)
    ckpt = load_checkpoint(ckpt_path)
    model = build_run_model(spec, data.input_shape, data.num_classes)
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        expected = model.eval()(data.x_test)
        assert torch.equal(exact(load_exported_run(out))(data.x_test), expected)
    weights = 100 * 100  # the first and last layers stay fp32
    assert report["ternary_weights"] == weights and report["packed_bytes"] == weights // 5
    assert report["bits_per_weight"] == 1.6
    assert report["checkpoint_bytes"] == ckpt_path.stat().st_size > report["file_bytes"]


# ---- errors ------------------------------------------------------------------------------

@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = build_run_model(MLP_RUN, (64,), 10)
    path = tmp_path / "m.safetensors"
    export_ternary(model, path, metadata=recipe(MLP_RUN, (64,)))
    return path


def rewrite(path, drop=(), change=None, metadata=None):
    tensors, meta = read_ternary(path)
    tensors = {k: v for k, v in tensors.items() if k not in drop} | (change or {})
    raw = {k: v if k == "chimera_format" else json.dumps(v) for k, v in meta.items()}
    save_file(tensors, path, metadata={**raw, **(metadata or {})})


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_exported_run(tmp_path / "nope.safetensors")
    (tmp_path / "text").write_text("hello, not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_exported_run(tmp_path / "text")
    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="lacks the Chimera ternary metadata"):
        load_exported_run(tmp_path / "plain.safetensors")


def test_load_rejects_missing_recipe_and_bad_metadata(exported):
    rewrite(exported, metadata={"layers": "{not json"})
    with pytest.raises(ValueError, match="malformed metadata"):
        load_exported_run(exported)
    torch.manual_seed(0)
    export_ternary(build_run_model(MLP_RUN, (64,), 10), exported)
    with pytest.raises(ValueError, match="recipe"):
        load_exported_run(exported)
    rewrite(exported, metadata={"layers": json.dumps({"3": {"kind": "conv3d", "config": {}}})})
    with pytest.raises(ValueError, match="invalid description"):
        load_ternary(exported, model=build_run_model(MLP_RUN, (64,), 10))


def test_load_rejects_tensor_mismatches(exported):
    wider = RunSpec(**{**MLP_RUN.to_dict(), "model_hparams": {"hidden": 50}})
    with pytest.raises(ValueError, match=r"does not match the model: 1.weight is"):
        load_ternary(exported, model=build_run_model(wider, (64,), 10))
    with pytest.raises(ValueError, match="is a ReLU"):
        load_ternary(exported, model=nn.Sequential(*[nn.ReLU()] * 6))
    with pytest.raises(ValueError, match="no module '3'"):
        load_ternary(exported, model=nn.Sequential(nn.Flatten()))
    rewrite(exported, drop=("5.bias",), change={"extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing tensors \['5.bias'\].*unexpected .*'extra'"):
        load_exported_run(exported)


def test_load_rejects_corrupt_packed_weights(exported):
    tensors, _ = read_ternary(exported)
    rewrite(exported, drop=("3.T.shape",))
    with pytest.raises(ValueError, match="missing the keys"):
        load_exported_run(exported)
    data = tensors["3.T.data"].clone()
    data[0] = 255
    rewrite(exported, change={"3.T.data": data, "3.T.shape": tensors["3.T.shape"]})
    with pytest.raises(ValueError, match="corrupt base3 data"):
        load_exported_run(exported)


def test_export_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="no ternary layers"):
        export_ternary(nn.Linear(3, 2), path)
    model = ternarize(nn.Sequential(nn.Linear(3, 2)), "chimera", skip=())
    with pytest.raises(ValueError, match="format must be one of"):
        export_ternary(model, path, format="1bit")
    with pytest.raises(ValueError, match="metadata keys"):
        export_ternary(model, path, metadata={"layers": "x"})
    with pytest.raises(ValueError, match="JSON-serializable"):
        export_ternary(model, path, metadata={"x": object()})
    with pytest.raises(ValueError, match="shares ternary layers"):
        export_ternary(nn.Sequential(model[0], model[0]), path)
    with pytest.raises(ValueError, match="checkpoint not found"):
        export_checkpoint(tmp_path / "none.pt", path)
    with pytest.raises(TypeError, match="cannot pack Linear"):
        PackedTernaryModule.from_module(nn.Linear(3, 2))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"act_quant": "per_row"}, "act_quant"), ({"group_size": 0}, "group_size"),
    ({"eps_beta": 0.0}, "eps_beta"), ({"clip": -1.0}, "clip"), ({"clip": True}, "clip"),
])
def test_packed_layer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PackedTernaryLinear(3, 2, **kwargs)


def test_root_ternary_layer_round_trips(tmp_path):
    layer = BitLinear(7, 3, warmup_steps=0).eval()
    x = torch.randn(4, 7)
    export_ternary(layer, tmp_path / "l.safetensors")
    loaded = load_ternary(tmp_path / "l.safetensors", model=BitLinear(7, 3), exact=True)
    assert isinstance(loaded, PackedTernaryLinear) and loaded.exact
    assert torch.equal(loaded(x), layer(x))
    fast = load_ternary(tmp_path / "l.safetensors", model=BitLinear(7, 3))
    assert not fast.exact and fast.integer_kernel_applies(x)
    assert torch.allclose(fast(x), layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="^exact must be True or False, got 1$"):
        load_ternary(tmp_path / "l.safetensors", model=BitLinear(7, 3), exact=1)


def one_line(info):
    message = str(info.value)
    assert "\n" not in message
    return message


def test_export_checkpoint_rejects_garbage_folders_and_damage_in_one_line(tmp_path):
    out = tmp_path / "m.safetensors"
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()
    cases = {"garbage.pt": "corrupt checkpoint", "empty.pt": "truncated",
             "folder.pt": "is a directory", "missing.pt": "not found"}
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match) as info:
            export_checkpoint(tmp_path / name, out)
        assert str(tmp_path / name) in one_line(info)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a Chimera checkpoint"):
        export_checkpoint(tmp_path / "foreign.pt", out)
    assert not out.exists()


def test_export_checkpoint_to_a_folder_and_a_damaged_run_checkpoint(tmp_path):
    spec = RunSpec(task="digits", model="mlp", optimizer="adamw", epochs=1, quantizer="chimera")
    ckpt = tmp_path / "run.pt"
    train(spec, progress=False, checkpoint=str(ckpt))
    with pytest.raises(ValueError, match="is a directory") as info:
        export_checkpoint(ckpt, tmp_path)
    one_line(info)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x80
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest mismatch") as info:
        export_checkpoint(ckpt, tmp_path / "m.safetensors")
    one_line(info)


def load_error(path):
    """The one-line ValueError message loading ``path`` gives, or None when it loads."""
    try:
        load_exported_run(path)
    except ValueError as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)
        return str(e)
    return None


def test_damaged_exported_files_load_or_fail_with_one_value_error_line(exported, tmp_path):
    """safetensors has no checksum: a changed tensor byte may load; anything else must be one
    ValueError line, never IndexError / OSError / RuntimeError."""
    data = exported.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")  # length field + JSON header
    bad = tmp_path / "bad.safetensors"
    for keep in (0, 7, 8, 100, header, len(data) - 1):
        bad.write_bytes(data[:keep])
        assert load_error(bad) is not None, keep
    failed = {}
    for region, (lo, hi) in {"header": (0, header), "file": (0, len(data))}.items():
        failed[region] = 0
        for i in range(30):
            damaged = bytearray(data)
            damaged[lo + i * (hi - 1 - lo) // 29] ^= 0xFF
            bad.write_bytes(bytes(damaged))
            failed[region] += load_error(bad) is not None
    assert failed["header"] >= 10, failed
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        load_exported_run(tmp_path / "dir.safetensors")


def test_malformed_layer_descriptions_are_value_errors(exported):
    rewrite(exported, metadata={"layers": json.dumps({"3": {"kind": "linear", "config": {
        "in_features": 100, "out_features": 100}}})},
        change={"3.T.shape": torch.tensor([10**6], dtype=torch.int64)})
    with pytest.raises(ValueError, match="ternary layer '3'"):
        load_exported_run(exported)
    rewrite(exported, metadata={"layers": json.dumps(["3"])})
    with pytest.raises(ValueError, match="'layers' must be a JSON object"):
        load_exported_run(exported)


def test_chimera_export_of_a_garbage_file_is_one_error_line(tmp_path, capsys):
    from chimera.cli import main

    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02" + bytes(range(200)))  # pickle-like bytes
    assert main(["export", str(tmp_path / "garbage.pt"), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chimera: error: corrupt checkpoint")
