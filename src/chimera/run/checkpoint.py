"""Run checkpoints: written atomically (temporary file, fsync, rename), verified when loaded.

File layout (container ``chimera-ckpt-v2``): the 16-byte ``MAGIC``, the SHA-256 digest of the
payload (32 bytes), the payload's length (8 bytes, big-endian), then the payload: ``torch.save``
of the checkpoint dict (tagged ``format: CHECKPOINT_FORMAT``). Any changed, missing or extra byte
anywhere in the file fails the check. A file without the magic that is a torch zip archive is a
legacy checkpoint (written before the digest existed): it still loads, unverified.

Errors are one ``ValueError`` line naming the file. :class:`CorruptCheckpointError` (a
``ValueError``) marks a damaged file: truncated, bytes changed, undecodable; a run resuming from
one restarts from scratch (:meth:`chimera.run.trainer.Trainer.fit`). A missing, foreign (a valid
file that is no Chimera checkpoint) or unreadable (the OS refuses it) file is a plain
``ValueError``: the file is not known to be damaged.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "chimera-checkpoint-v1"  # the payload dict's layout tag
MAGIC = b"chimera-ckpt-v2\n"
HEADER = struct.Struct(">16s32sQ")  # magic, SHA-256 of the payload, payload length
ZIP_MAGIC = b"PK\x03\x04"  # a torch.save archive: the legacy checkpoint file
REQUIRED_KEYS = ("spec", "input_shape", "num_classes", "model")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is damaged (truncated, changed bytes, undecodable)."""


def _temporaries(path: Path) -> list[Path]:
    """The temporary files of writers of ``path`` (``.<name>.<random>.tmp``)."""
    pattern = f".{glob.escape(path.name)}.*.tmp"
    return [p for p in path.parent.glob(pattern) if p.is_file()]


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer of checkpoint ``path`` left; returns them.
    (One writer per checkpoint path: a concurrent writer's temporary would go too.)"""
    removed = _temporaries(Path(path))
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) to ``path`` with its digest, atomically: a crash
    leaves either the old file or the new one, never a truncated one. Temporaries left by a
    killed earlier writer of ``path`` are removed first."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint path {path} is a directory; expected a file path")
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buffer)
    data = buffer.getbuffer()
    header = HEADER.pack(MAGIC, hashlib.sha256(data).digest(), len(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _read(path: Path) -> bytes:
    """The file's bytes; a folder, a missing or an unreadable file is one ValueError line."""
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory; expected a checkpoint file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"checkpoint not found: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror or e}") from None


def _verified_payload(path: Path, data: bytes) -> bytes:
    """The payload of a v2 file after its length and digest checks."""
    if len(data) < HEADER.size:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: truncated to {len(data)} "
                                     f"bytes, shorter than its {HEADER.size}-byte header")
    _, digest, length = HEADER.unpack_from(data)
    payload = data[HEADER.size :]
    if len(payload) != length:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: {len(payload)} payload bytes, "
                                     f"its header says {length} (truncated or extended)")
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: SHA-256 digest mismatch "
                                     "(bytes changed since it was written)")
    return payload


def _decode(path: Path, data: bytes, verified: bool) -> Any:
    """``torch.load`` of checkpoint bytes; any failure is one ValueError line (arbitrary bytes
    can make the zip reader or the unpickler raise nearly any exception type)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # undecodable bytes raise many types
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        if verified:  # intact bytes this torch cannot load: not damage
            raise ValueError(f"checkpoint {path} is intact but does not load ({reason})"
                             ) from None
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: {reason}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint` (a legacy checkpoint
    without a digest loads unverified); a missing, corrupt or foreign file raises one
    ``ValueError`` line saying which (:class:`CorruptCheckpointError` when it is damaged)."""
    path = Path(path)
    data = _read(path)
    if data.startswith(MAGIC) or MAGIC.startswith(data):  # the latter: cut inside the magic
        ckpt = _decode(path, _verified_payload(path, data), verified=True)
    elif data.startswith(ZIP_MAGIC):
        ckpt = _decode(path, data, verified=False)
    else:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {path}: it starts with {data[:8]!r}, neither the checkpoint "
            f"header {MAGIC!r} nor a legacy torch archive")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Chimera checkpoint (expected {CHECKPOINT_FORMAT})")
    for key in REQUIRED_KEYS:
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks '{key}'")
    return ckpt


def aside_path(path: str | os.PathLike, stamp: str) -> Path:
    """A free name ``<path>.corrupt-<stamp>`` (``-2``, ``-3``, ... appended if taken) to move a
    damaged file to."""
    path = Path(path)
    candidate, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return candidate
