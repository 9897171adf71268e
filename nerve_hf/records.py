"""``nerve_metrics.jsonl``: one JSON object per FFN site per measurement.

Each line holds ``step, split, site, layer, dim, tokens`` and the seven metrics. Lines are appended and
flushed one measurement at a time, so a crash loses at most the measurement being written; a resumed
run first drops the lines of steps after its checkpoint, so no record is duplicated or lost.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["RECORDS_FILENAME", "append_records", "read_records", "drop_records_after"]

RECORDS_FILENAME = "nerve_metrics.jsonl"


def _jsonable(value):
    """NaN/Inf become null (strict JSON); everything else passes through."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_records(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records as JSON lines and flush them to disk."""
    lines = "".join(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n" for record in records)
    if not lines:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of a JSONL file (null metrics come back as NaN); a torn last line is skipped."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            yield {k: (float("nan") if v is None else v) for k, v in record.items()}


def drop_records_after(path: str | os.PathLike, step: int) -> int:
    """Rewrite the file without records of steps > ``step`` (atomically); return how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    records = list(read_records(path))
    kept = [record for record in records if int(record.get("step", 0)) <= step]
    if len(kept) == len(records):
        return 0
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.unlink(missing_ok=True)
    append_records(temporary, kept)
    temporary.touch()
    os.replace(temporary, path)
    return len(records) - len(kept)
