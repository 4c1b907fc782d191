"""Export of ternary models to one safetensors file, and inference models from it
(docs/algorithms.md#packing-and-export).

File layout (``FILE_FORMAT``). For every ternary layer (Bit or integer-ternary) named ``L``:
``L.T.data`` / ``L.T.shape`` / ``L.T.format`` (its ternary weight packed by ``pack_ternary``, see
``packed_to_tensors``), ``L.scale`` (float32: the layer's ``gamma`` or per-group scales ``S``) and
``L.bias``; every other entry of the model's ``state_dict`` as is (BatchNorm buffers, fp32 layers).
Metadata (str -> str): ``chimera_format``, ``layers`` (JSON ``{L: {"kind", "config"}}`` of the
:mod:`chimera.deploy.packed` inference layers) and each caller metadata value as JSON (for instance
the recipe that rebuilds the model). The inference model's
outputs equal the eval-mode outputs of the exported model exactly with ``load_ternary(...,
exact=True)``; by default its linear layers may use the faster integer kernel, whose outputs
agree within the float path's own rounding (:mod:`chimera.deploy.packed`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from chimera.deploy.packed import PACKED_LAYERS, TERNARY_LAYER_TYPES, PackedTernaryModule
from chimera.quant.packing import (
    pack_ternary,
    packed_from_tensors,
    packed_to_tensors,
    unpack_ternary,
)

FILE_FORMAT = "chimera-ternary-v1"
RESERVED_KEYS = ("chimera_format", "layers")


def _key(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def _ternary_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every Bit / integer-ternary layer; each must have a single name."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TERNARY_LAYER_TYPES):
            names.setdefault(id(module), []).append(name)
    shared = [n for n in names.values() if len(n) > 1]
    if shared:
        raise ValueError(f"model shares ternary layers under several names {shared}; "
                         "export_ternary needs each ternary layer under one name")
    return {n: m for n, m in model.named_modules() if isinstance(m, TERNARY_LAYER_TYPES)}


def _file_metadata(metadata: Mapping[str, Any] | None, layers: dict[str, Any]) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k in metadata if not isinstance(k, str) or k in RESERVED_KEYS]
    if bad:
        raise ValueError(f"metadata keys must be strings other than {RESERVED_KEYS}, got {bad}")
    try:
        encoded = {k: json.dumps(v) for k, v in metadata.items()}
    except TypeError as e:
        raise ValueError(f"metadata values must be JSON-serializable: {e}") from None
    return {**encoded, "chimera_format": FILE_FORMAT, "layers": json.dumps(layers)}


def _one_line(error: BaseException) -> str:
    """An exception's message with its line breaks folded (errors here are one line)."""
    return " ".join(str(error).split()) or type(error).__name__


def _write(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` with its failures (a folder, no permission, a full disk) as ValueError."""
    if path.is_dir():
        raise ValueError(f"export path {path} is a directory; expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path, metadata=metadata)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot write {path}: {_one_line(e)}") from None


def _saved_size(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def export_ternary(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    format: str = "base3",
) -> dict[str, Any]:
    """Write ``model`` to the safetensors file ``path`` (layout in the module docstring).

    ``metadata``: JSON-able values by string key (a run's export stores its recipe there);
    ``format``: ``base3``
    (1.6 bits/weight) or ``2bit``. Returns the report ``{format, ternary_layers,
    ternary_weights, packed_bytes, bits_per_weight = 8 * packed_bytes / ternary_weights,
    file_bytes, state_dict_bytes (torch.save size of the model's state_dict: the fp32
    checkpoint of a Bit-layer model), compression = state_dict_bytes / file_bytes}``.
    """
    layers = _ternary_layers(model)
    if not layers:
        raise ValueError("model has no ternary layers (Bit or integer-ternary); nothing to export")
    tensors: dict[str, Tensor] = {}
    layer_info: dict[str, Any] = {}
    packed_bytes = weights = 0
    for name, layer in layers.items():
        inference = PackedTernaryModule.from_module(layer).cpu()
        packed = pack_ternary(inference.T, format)
        tensors |= packed_to_tensors(packed, _key(name, "T"))
        tensors[_key(name, "scale")] = inference.scale
        if inference.bias is not None:
            tensors[_key(name, "bias")] = inference.bias
        layer_info[name] = {"kind": inference.KIND, "config": inference.config()}
        packed_bytes += packed.data.numel()
        weights += packed.numel
    state = model.state_dict()
    for key, value in state.items():
        if key.rpartition(".")[0] in layers:
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, not a "
                             "tensor; a safetensors file holds tensors only")
        tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    path = Path(path)
    _write(tensors, path, _file_metadata(metadata, layer_info))
    file_bytes, state_bytes = path.stat().st_size, _saved_size(state)
    return {"format": format, "ternary_layers": len(layers), "ternary_weights": weights,
            "packed_bytes": packed_bytes, "bits_per_weight": 8 * packed_bytes / weights,
            "file_bytes": file_bytes, "state_dict_bytes": state_bytes,
            "compression": state_bytes / file_bytes}


def read_ternary(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the JSON-decoded metadata of a file written by :func:`export_ternary`;
    a missing, unreadable or malformed file (or a folder) is one ValueError line."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a ternary model (.safetensors) file")
    if not path.is_file():
        raise ValueError(f"ternary model file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {_one_line(e)}") from None
    if raw.get("chimera_format") != FILE_FORMAT or "layers" not in raw:
        raise ValueError(f"{path} lacks the Chimera ternary metadata (chimera_format = "
                         f"{FILE_FORMAT!r} and layers); write it with export_ternary")
    try:
        meta = {k: v if k == "chimera_format" else json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has malformed metadata: {e}") from None
    if not isinstance(meta["layers"], dict):
        raise ValueError(f"{path} has malformed metadata: 'layers' must be a JSON object, got "
                         f"{type(meta['layers']).__name__}")
    return tensors, meta


def _inference_layer(name: str, info: Any) -> PackedTernaryModule:
    try:
        return PACKED_LAYERS[info["kind"]](**info["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"layer {name!r} has an invalid description {info!r}: {e!r}") from None


def _swap(model: nn.Module, name: str, layer: PackedTernaryModule) -> nn.Module:
    """Put ``layer`` in place of the module ``name`` of ``model`` (which must be a layer of the
    same kind: float, Bit, integer-ternary or packed); returns the model."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module {name!r} (a ternary layer in the file)"
                         ) from None
    kinds = (*layer.SOURCES, layer.SOURCES[0]._FLOAT_TYPE, type(layer))
    if not isinstance(old, kinds):
        raise ValueError(f"module {name!r} is a {type(old).__name__}, but the file holds a "
                         f"{layer.KIND} ternary layer there")
    if not name:
        return layer
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
    return model


def _check_state(expected: Mapping[str, Any], state: Mapping[str, Tensor], path: Path) -> None:
    problems = [f"missing tensors {sorted(expected.keys() - state.keys())}",
                f"unexpected tensors {sorted(state.keys() - expected.keys())}"]
    problems = [p for p in problems if not p.endswith("[]")]
    problems += [
        f"{k} is {state[k].dtype}{list(state[k].shape)}, the model needs {v.dtype}{list(v.shape)}"
        for k, v in expected.items()
        if k in state and (v.shape != state[k].shape or v.dtype != state[k].dtype)
    ]
    if problems:
        raise ValueError(f"{path} does not match the model: " + "; ".join(problems))


def _unpack_layer(state: dict[str, Tensor], prefix: str) -> None:
    """Replace the packed entries ``<prefix>.data/.shape/.format`` of ``state`` by the unpacked
    int8 tensor ``<prefix>`` (ValueError on corrupt data)."""
    packed = packed_from_tensors(state, prefix)
    for key in packed_to_tensors(packed, prefix):
        del state[key]
    state[prefix] = unpack_ternary(packed)


def load_ternary(path: str | os.PathLike, model: nn.Module, *, exact: bool = False
                 ) -> nn.Module:
    """The inference model of a file written by :func:`export_ternary`, in eval mode.

    ``model`` is an instance of the exported architecture (float, ternary or packed layers; its
    values are all overwritten): each ternary layer becomes its :mod:`chimera.deploy.packed`
    layer and every tensor is loaded from the file (strictly). Returns the model (or the packed
    layer when ``model`` itself is the one ternary layer). ``exact`` sets the packed layers'
    ``exact``: True reproduces the exported model's eval outputs bit for bit; False (default)
    lets linear layers use the integer kernel (faster on CPU; outputs within the float path's
    rounding, see :mod:`chimera.deploy.packed`).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module of the exported architecture, got "
                         f"{type(model).__name__}")
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be True or False, got {exact!r}")
    path = Path(path)
    tensors, meta = read_ternary(path)
    state = dict(tensors)
    for name, info in meta["layers"].items():
        try:
            layer = _inference_layer(name, info)
            layer.exact = exact
            model = _swap(model, name, layer)
            _unpack_layer(state, _key(name, "T"))
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise ValueError(f"{path}: ternary layer {name!r}: {_one_line(e)}") from None
    _check_state(model.state_dict(), state, path)
    model.load_state_dict(state)
    return model.eval()
