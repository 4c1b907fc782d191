"""Run checkpoints to deployable files and back: the recipe (run spec, input shape, number of
classes) travels in the exported file's metadata, so the model can be rebuilt from it alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from chimera.deploy.export import export_ternary, load_ternary, read_ternary
from chimera.run.build import build_run_model
from chimera.run.checkpoint import load_checkpoint
from chimera.run.spec import RunSpec

RECIPE_KEYS = ("spec", "input_shape", "num_classes")


def recipe_model(recipe: dict[str, Any], where: str | os.PathLike) -> nn.Module:
    """The (untrained) model of a run recipe ``{spec, input_shape, num_classes}``; a missing or
    malformed recipe is one ValueError line naming ``where``."""
    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise ValueError(f"{where} lacks the run recipe {missing}; load it with "
                         "chimera.load_ternary(path, model) and a model of its architecture")
    try:
        spec = RunSpec(**recipe["spec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} has an invalid run spec in its recipe: {e}") from None
    try:
        return build_run_model(spec, tuple(recipe["input_shape"]), recipe["num_classes"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{where} has an invalid run recipe (input_shape "
                         f"{recipe['input_shape']!r}, num_classes {recipe['num_classes']!r}): "
                         f"{' '.join(str(e).split())}") from None


def export_checkpoint(
    checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, format: str = "base3"
) -> dict[str, Any]:
    """Export a run checkpoint (``Trainer(..., checkpoint=...)``): rebuild the run's model, load
    its weights and ``export_ternary`` it with the recipe as metadata; the report adds
    ``checkpoint_bytes`` (the checkpoint file, optimizer state included). A missing, damaged or
    foreign checkpoint, or a folder for either path, is one ValueError line."""
    ckpt = load_checkpoint(checkpoint_path)
    recipe = {k: ckpt[k] for k in RECIPE_KEYS}
    model = recipe_model(recipe, checkpoint_path)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        reason = " ".join(str(e).split())  # load_state_dict's message spans lines
        raise ValueError(f"checkpoint {checkpoint_path} does not fit its run's model: {reason}"
                         ) from None
    report = export_ternary(model, out_path, metadata=recipe, format=format)
    return {**report, "checkpoint_bytes": os.path.getsize(checkpoint_path)}


def load_exported_run(path: str | os.PathLike) -> nn.Module:
    """The inference model of a file written by :func:`export_checkpoint`, rebuilt from the
    recipe in its metadata."""
    _, meta = read_ternary(path)
    return load_ternary(path, recipe_model(meta, Path(path)))
