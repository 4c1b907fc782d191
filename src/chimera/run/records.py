"""JSON Lines records: one object per line, appended and flushed as they happen.

The writer emits each record with a single ``write`` of the complete line and flushes it, so a
crash can at worst leave one unterminated last line; on reopening a file the writer cuts such a
tail off, and the reader ignores it, so no reader ever sees a broken record. Any other malformed
line (disk or copy corruption, a hand edit) is skipped by the reader and reported to a caller
that asks (``read_records(..., skipped=[])``), so one bad line never blocks a sweep or a report.
Every record carries ``time``, when it was written: ISO 8601 UTC with milliseconds
(``2025-01-31T12:00:00.123Z``). It is bookkeeping, not a measurement: compare records of two
runs with :func:`without_time`. The schema is in docs/records.md.

The JSONL file is the source of truth; a writer can also mirror every record to *sinks*
(:class:`RecordSink`, e.g. :class:`TensorBoardSink`), called after the line is flushed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

RECORD_TYPES = ("step", "epoch", "eval", "final", "summary")
TIME_KEY = "time"


def utc_now() -> str:
    """The current time as ISO 8601 UTC with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def without_time(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its ``time`` (for comparing records of two runs)."""
    return {k: v for k, v in record.items() if k != TIME_KEY}


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


class RecordSink(Protocol):
    """Where a :class:`RecordWriter` mirrors its records: ``write`` gets each record as written
    (cleaned, ``time`` included) and the names of its identity fields (who wrote it, not what
    was measured); ``close`` ends it with the writer."""

    def write(self, record: dict[str, Any], identity: Collection[str]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict[str, Any], identity: Collection[str]) -> dict[str, float]:
    """The record's measured numbers: top-level ints and floats (not booleans) that are neither
    identity nor bookkeeping."""
    skip = {*identity, "record_type", TIME_KEY, "step"}
    return {k: v for k, v in record.items() if k not in skip
            and isinstance(v, int | float) and not isinstance(v, bool)}


def summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or one ``ValueError`` line saying how to
    install the ``tensorboard`` package it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--log tensorboard needs the tensorboard package: "
                         'pip install -c constraints.txt "chimera[tracking]"') from None
    return SummaryWriter


class TensorBoardSink:
    """Mirrors records to TensorBoard: one event folder ``<logdir>/<run_id>`` per run (records
    without a ``run_id`` go to ``logdir``), each measured number as the scalar
    ``<record_type>/<field>`` at the record's ``step`` (``steps`` for final records, else 0).
    Needs the ``tensorboard`` package (``pip install "chimera[tracking]"``)."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        self.logdir, self._new = Path(logdir), summary_writer_class()
        self._writers: dict[str, Any] = {}

    def write(self, record: dict[str, Any], identity: Collection[str]) -> None:
        run = str(record.get("run_id", ""))
        if run not in self._writers:
            self._writers[run] = self._new(str(self.logdir / run))
        writer = self._writers[run]
        step = record.get("step", record.get("steps", 0))
        for name, value in _scalars(record, identity).items():
            writer.add_scalar(f"{record['record_type']}/{name}", value, step)
        if record["record_type"] != "step":  # an epoch's end: on disk with its checkpoint
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


LOG_SINKS = {"tensorboard": TensorBoardSink}  # --log NAME -> sink class taking a folder


class RecordWriter:
    """Appends records to a JSONL file; ``identity`` fields are merged into every record, and
    every record is also handed to each of ``sinks`` (:class:`RecordSink`)."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any] | None = None,
                 sinks: Sequence[RecordSink] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_tail(self.path)
        self.identity = dict(identity or {})
        self.sinks = tuple(sinks)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record_type: str, **fields: Any) -> dict[str, Any]:
        """Write one record of ``record_type`` (one of RECORD_TYPES), stamped with ``time``
(:func:`utc_now`), and flush it."""
        if record_type not in RECORD_TYPES:
            raise ValueError(f"record_type must be one of {RECORD_TYPES}, got {record_type!r}")
        record = _clean({**self.identity, "record_type": record_type, TIME_KEY: utc_now(),
                         **fields})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.write(record, self.identity.keys())
        return record

    def with_identity(self, **identity: Any) -> RecordWriter:
        """A writer to the same file and sinks whose records also carry ``identity``."""
        child = RecordWriter.__new__(RecordWriter)
        child.path, child._file, child.sinks = self.path, self._file, self.sinks
        child.identity = {**self.identity, **identity}
        return child

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SkippedLine(NamedTuple):
    """A malformed line :func:`read_records` left out: its file, 1-based line number and why."""

    path: Path
    lineno: int
    reason: str


def _record_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The files to read: ``paths`` itself, every ``*.jsonl`` of a directory, or each of a list;
    each must be an existing, regular file (ValueError naming it otherwise)."""
    if isinstance(paths, str | os.PathLike):
        p = Path(paths)
        paths = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    files = [Path(p) for p in paths]
    for path in files:
        if not path.exists():
            raise ValueError(f"record file not found: {path}")
        if not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file"
            raise ValueError(f"record file {path} is {what}; expected a *.jsonl file (a folder "
                             "is read only when given on its own)")
    return files


def _complete_lines(path: Path) -> list[bytes]:
    """The file's newline-terminated lines (an unterminated last line is dropped); a file that
    cannot be read raises ValueError naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read record file {path}: {e.strerror or e}") from None
    return data.split(b"\n")[:-1]  # the last element is b"" or an unterminated partial line


def _parse_line(raw: bytes) -> dict[str, Any] | str:
    """The record on one line, or the reason it is malformed."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg})"
    except RecursionError:
        return "not JSON (nested too deeply)"
    if not isinstance(rec, dict):
        return "not a JSON object"
    if rec.get("record_type") not in RECORD_TYPES:
        return "record_type missing or unknown"
    return rec


def read_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike], record_type: str | None = None,
    *, skipped: list[SkippedLine] | None = None,
) -> list[dict[str, Any]]:
    """Load records from one JSONL file, several files, or every ``*.jsonl`` of a directory.

    An unterminated last line (a crash mid-write) is ignored, as are blank lines. Any other
    malformed line (not UTF-8, not JSON, not an object, no valid ``record_type``) is skipped,
    never fatal, and appended to ``skipped`` (when given) as a :class:`SkippedLine`. A missing,
    unreadable or non-regular file raises ``ValueError`` naming it.
    """
    out: list[dict[str, Any]] = []
    for path in _record_files(paths):
        for lineno, raw in enumerate(_complete_lines(path), 1):
            if not raw.strip():
                continue
            rec = _parse_line(raw)
            if isinstance(rec, str):
                if skipped is not None:
                    skipped.append(SkippedLine(path, lineno, rec))
            elif record_type is None or rec["record_type"] == record_type:
                out.append(rec)
    return out
