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
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple, Optional

from nerve_hf.sinks.base import WarnOnce
from nerve_hf.sinks.files import jsonable, remove_partial_writes, write_bytes

if TYPE_CHECKING:
    from nerve_hf.report import SpectralReport

__all__ = [
    "RECORDS_FILENAME",
    "Scan",
    "append_records",
    "read_records",
    "scan_records",
    "skipped_lines_message",
    "drop_records_after",
    "report_records",
    "RecordsSink",
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


def new_run_id() -> str:
    """A new run identity: 12 hexadecimal digits, random."""
    return uuid.uuid4().hex[:12]


def run_at(path: Path, step: int) -> Optional[str]:
    """The run id of the last record at or before ``step`` in ``path`` (None: no such record has one)."""
    if not path.exists():
        return None
    runs = [r["run"] for r in scan_records(path).records if int(r.get("step", 0)) <= step and r.get("run")]
    return runs[-1] if runs else None


def move_earlier_runs(path: Path, run: str) -> str:
    """Move the records of runs other than ``run`` from ``path`` to ``<stem>.<their run>.jsonl`` beside it
    (``<stem>.earlier.jsonl`` for records without a run id); returns what was moved where ('' if nothing)."""
    if not path.exists():
        return ""
    records = scan_records(path).records
    others: dict[str, list[dict]] = {}
    for record in records:
        if record.get("run") != run:
            others.setdefault(str(record.get("run") or "earlier"), []).append(record)
    if not others:
        return ""
    moved = []
    for other, kept in others.items():
        aside = path.with_name(f"{path.stem}.{other}{path.suffix}")
        append_records(aside, kept)
        moved.append(f"{len(kept)} records of run {other} moved to {aside.name}")
    write_bytes(path, _encode([r for r in records if r.get("run") == run]))
    return "; ".join(moved) + " (nerve report reads one run per file)"


def _beyond_rows(report: SpectralReport, row: dict) -> dict:
    """What the options beyond the paper add to a site's record: ``positions`` (its bucket rows) and,
    towards the next layer, ``cka_next``, ``js_pre_next`` and ``js_post_next``; nothing when they are off."""
    extra = {}
    if report.positions:
        extra["positions"] = [
            {k: v for k, v in bucket.items() if k not in ("site", "layer", "dim")}
            for bucket in report.positions
            if bucket["site"] == row["site"]
        ]
    prefix = f"nerve/{row['site']}/"
    for key, value in report.to_log_dict().items() if report.cross_layer else ():
        if key.startswith(prefix) and key.endswith("_next"):
            extra[key[len(prefix) :]] = value
    return extra


def report_records(report: SpectralReport, split: str, step: int) -> list[dict]:
    """One record per row of ``report``: ``step, split, sites`` (the number of rows), the row, and what the
    options beyond the paper add to it (position buckets, the cross-layer values towards the next layer)."""
    return [
        {"step": step, "split": split, "sites": len(report.rows), **row, **_beyond_rows(report, row)}
        for row in report.rows
    ]


class RecordsSink:
    """Appends every measurement's records (:func:`report_records`) to a JSONL file, e.g.
    ``<output_dir>/nerve_metrics.jsonl``; a failed write warns once and later measurements are tried again.

    >>> import tempfile
    >>> from nerve_hf.report import SpectralReport
    >>> path = Path(tempfile.mkdtemp()) / RECORDS_FILENAME
    >>> sink = RecordsSink(path)
    >>> for step in (2, 4):
    ...     sink.write(SpectralReport(rows=[{"site": "ffn.0", "layer": 0, "pr_pre": 3.5}]), "train", step)
    >>> sink.drop_after(2)
    >>> [(r["step"], r["split"], r["sites"], r["pr_pre"]) for r in read_records(path)]
    [(2, 'train', 1, 3.5)]
    """

    def __init__(self, path: str | os.PathLike, run: Optional[str] = None) -> None:
        self.path = Path(path)
        self.run = run or new_run_id()  # written in every record: a reader tells runs sharing a file apart
        self._warn = WarnOnce()

    def write(self, report: SpectralReport, split: str, step: int) -> None:
        try:
            append_records(self.path, [{"run": self.run, **r} for r in report_records(report, split, step)])
        except OSError as error:
            self._warn(
                "write",
                f"NerveCallback: records are not being written to {self.path} ({type(error).__name__}: {error}); "
                f"the metrics still reach the Trainer's logs and report_to integrations. Later measurements "
                f"are tried again without a new warning.",
            )

    def drop_after(self, step: int) -> None:
        """A training run starts at ``step``: resumed (``step`` > 0), it continues the run whose records the
        file holds up to ``step`` (their run id) and drops what came after; started afresh, the records of
        earlier runs are moved aside (:func:`move_earlier_runs`), with one warning that says where."""
        try:
            remove_partial_writes(self.path.parent, self.path.name)  # a killed rewrite's partial copy
            if step > 0:
                self.run = run_at(self.path, step) or self.run
            else:
                moved = move_earlier_runs(self.path, self.run)
                if moved:
                    self._warn("earlier", f"NerveCallback: {self.path} held the records of an earlier run; {moved}")
            drop_records_after(self.path, step)
        except OSError as error:
            self._warn(
                "drop",
                f"NerveCallback: could not drop the records after step {step} in {self.path.parent} "
                f"({type(error).__name__}: {error}); a step may be kept twice (nerve report keeps the last)",
            )
