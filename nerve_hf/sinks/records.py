"""``nerve_metrics.jsonl``: one JSON object per FFN site per measurement.

Each line holds ``step, split, sites, site, layer, dim, tokens`` and the seven metrics, where ``sites``
is the number of FFN sites of that measurement (a step with fewer records is incomplete). Lines are appended and
flushed one measurement at a time, so a crash loses at most the measurement being written; an append
after a line torn by a crash starts on a fresh line, so the torn fragment stays a line of its own and
the new records survive. Reading skips unreadable lines with one warning that names them; a resumed run
first drops the lines of steps after its checkpoint, so no record is duplicated or lost.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple

from nerve_hf.sinks.files import jsonable, write_bytes

__all__ = [
    "RECORDS_FILENAME",
    "Scan",
    "append_records",
    "read_records",
    "scan_records",
    "skipped_lines_message",
    "drop_records_after",
]

RECORDS_FILENAME = "nerve_metrics.jsonl"


def _encode(records: Iterable[dict]) -> bytes:
    """One strict-JSON line per record (NaN/Inf as null)."""
    return "".join(json.dumps(jsonable(record), allow_nan=False) + "\n" for record in records).encode("utf-8")


def _ends_torn(path: Path) -> bool:
    """Whether ``path`` is a non-empty file whose last byte is not a newline."""
    try:
        with path.open("rb") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


def append_records(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records as JSON lines on a fresh line, then flush and fsync them (one call, one measurement)."""
    data = _encode(records)
    if not data:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _ends_torn(path):
        data = b"\n" + data  # the torn fragment stays its own (unreadable) line
    with path.open("ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _decode(line: bytes) -> dict | None:
    """The record of one line, or None when the line is not a JSON object."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    return {k: (math.nan if v is None else v) for k, v in record.items()}


class Scan(NamedTuple):
    """What :func:`scan_records` found in a records file."""

    records: list[dict]  # null metrics as NaN
    skipped: list[int]  # 1-based numbers of the lines that are not a JSON object (cut short by a crash, garbage)
    lines: int  # non-blank lines


def scan_records(path: str | os.PathLike) -> Scan:
    """Every line of a JSONL file decoded: the records, and which non-blank lines are not one."""
    records, skipped, lines = [], [], 0
    for number, line in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        lines += 1
        record = _decode(line)
        if record is None:
            skipped.append(number)
        else:
            records.append(record)
    return Scan(records, skipped, lines)


def skipped_lines_message(path: str | os.PathLike, skipped: list[int]) -> str:
    """``skipped 2 unreadable lines (lines 3, 7) of <path>: cut short by a crash or not JSON``."""
    noun = "line" if len(skipped) == 1 else "lines"
    return (
        f"skipped {len(skipped)} unreadable {noun} ({noun} {', '.join(map(str, skipped))}) of {path}: "
        f"cut short by a crash or not JSON"
    )


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file (null metrics come back as NaN); unreadable lines are skipped with one
    RuntimeWarning that names them."""
    records, skipped, _ = scan_records(path)
    if skipped:
        warnings.warn(skipped_lines_message(path, skipped), RuntimeWarning, stacklevel=2)
    return records


def drop_records_after(path: str | os.PathLike, step: int) -> int:
    """Rewrite the file without records of steps > ``step`` and without unreadable lines (atomically, with
    :func:`nerve_hf.sinks.files.write_bytes`); return how many records were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    records, skipped, _ = scan_records(path)
    if skipped:
        warnings.warn(skipped_lines_message(path, skipped), RuntimeWarning, stacklevel=2)
    kept = [record for record in records if int(record.get("step", 0)) <= step]
    if len(kept) < len(records) or skipped:
        write_bytes(path, _encode(kept))
    return len(records) - len(kept)
