"""JSON Lines records: one object per line, appended and flushed as they happen.

The writer emits each record with a single ``write`` of the complete line and flushes it, so a
crash can at worst leave one unterminated last line; on reopening a file the writer cuts such a
tail off, and the reader ignores it, so no reader ever sees a broken record. The schema is in
docs/records.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORD_TYPES = ("step", "epoch", "eval", "final", "summary")


def _clean(value: Any) -> Any:
    """Non-finite floats become None (strict JSON); tensors and numpy scalars become floats/ints."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _drop_partial_tail(path: Path) -> None:
    """Truncate an unterminated last line left by a crash mid-write."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


class RecordWriter:
    """Appends records to a JSONL file; ``identity`` fields are merged into every record."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_tail(self.path)
        self.identity = dict(identity or {})
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record_type: str, **fields: Any) -> dict[str, Any]:
        """Write one record of ``record_type`` (one of RECORD_TYPES) and flush it."""
        if record_type not in RECORD_TYPES:
            raise ValueError(f"record_type must be one of {RECORD_TYPES}, got {record_type!r}")
        record = _clean({**self.identity, "record_type": record_type, **fields})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        return record

    def with_identity(self, **identity: Any) -> RecordWriter:
        """A writer to the same file whose records also carry ``identity``."""
        child = RecordWriter.__new__(RecordWriter)
        child.path, child._file = self.path, self._file
        child.identity = {**self.identity, **identity}
        return child

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike], record_type: str | None = None
) -> list[dict[str, Any]]:
    """Load records from one JSONL file, several files, or every ``*.jsonl`` of a directory.

    An unterminated last line (a crash mid-write) is ignored; any other malformed line raises
    ``ValueError`` naming the file and line number.
    """
    if isinstance(paths, str | os.PathLike):
        p = Path(paths)
        paths = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    out: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"record file not found: {path}")
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete = lines[:-1]  # the last element is "" or an unterminated partial line
        for lineno, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: broken record ({e.msg})") from None
            if record_type is None or rec.get("record_type") == record_type:
                out.append(rec)
    return out
