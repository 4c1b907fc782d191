"""The run layer: a run spec, the objects built from it, the Trainer with its callbacks,
checkpoints and records. It sits on the library and under the harness (docs/architecture.md)."""

from chimera.run.build import build_run_model
from chimera.run.callbacks import Callback
from chimera.run.checkpoint import load_checkpoint, save_checkpoint
from chimera.run.export_run import export_checkpoint, load_exported_run
from chimera.run.records import RecordWriter, read_records
from chimera.run.spec import RunSpec
from chimera.run.trainer import Trainer, train

__all__ = [
    "Callback",
    "RecordWriter",
    "RunSpec",
    "Trainer",
    "build_run_model",
    "export_checkpoint",
    "load_checkpoint",
    "load_exported_run",
    "read_records",
    "save_checkpoint",
    "train",
]
