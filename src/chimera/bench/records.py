"""Records as a pandas DataFrame for analysis (needs the ``analysis`` extra)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from chimera.run.records import read_records

IDENTITY_COLUMNS = ("run_id", "config_id", "record_type", "seed", "task", "model", "optimizer",
                    "quantizer", "rule")


def import_pandas() -> Any:
    """The ``pandas`` module, or one ``ValueError`` line saying how to install it."""
    try:
        import pandas
    except ImportError:
        raise ValueError('to_dataframe needs the pandas package: pip install -c constraints.txt '
                         '"chimera[analysis]"') from None
    return pandas


def to_dataframe(paths: str | os.PathLike | Iterable[str | os.PathLike],
                 record_type: str | None = None) -> Any:
    """One row per record of ``paths`` (a record file, a list of them, or every ``*.jsonl`` of
    a folder and its subfolders, as ``chimera report`` reads it), optionally of one
    ``record_type``; the run identity columns (``IDENTITY_COLUMNS``, those present) come first,
    then ``file`` (the record file, relative to a folder given), then every other field."""
    pandas = import_pandas()
    if isinstance(paths, str | os.PathLike) and os.path.isdir(paths):
        base = os.fspath(paths)
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(base) for f in names
                       if f.endswith(".jsonl"))
    else:
        base, files = None, [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    rows = [{**rec, "file": os.path.relpath(f, base) if base else os.fspath(f)}
            for f in files for rec in read_records(f, record_type)]
    frame = pandas.DataFrame(rows)
    first = [c for c in (*IDENTITY_COLUMNS, "file") if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]
