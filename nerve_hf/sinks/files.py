"""Atomic file writes: a file in the output directory is either the old one or the complete new one.

Every writer puts its bytes in a temporary file beside the target and ``os.replace``-s it into place,
so an error (or Ctrl-C) half-way through never leaves a truncated file and never removes an old one.
:func:`check_writable_dir` tells, before any work, whether an output folder can be written at all.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path

from nerve_hf.errors import InputError, requires

__all__ = ["check_writable_dir", "jsonable", "write_bytes", "write_text", "write_json", "write_csv", "write_figure"]

WRITABLE_HINT = "pass a folder you can write to"


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its ancestors that do not exist, outermost first."""
    missing = []
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def check_writable_dir(path: str | os.PathLike, flag: str = "--out", hint: str = WRITABLE_HINT) -> Path:
    """``path`` as a Path when it is (or can be made) a folder in which a file can be created; else an
    InputError of one sentence naming ``flag``, the path, the reason and ``hint``.

    The test creates the missing folders and a temporary file in ``path`` (permission bits alone do not
    tell for root or on read-only mounts), then removes both: a later error leaves nothing behind.
    """
    path = Path(path)
    where = f"{flag} {str(path)!r}"
    if path.exists() and not path.is_dir():
        raise InputError(f"{where} is a file, not a folder: {hint}")
    created = _missing_folders(path)
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"{where} cannot be created ({error.strerror or error}): {hint}") from None
        try:
            handle, temporary = tempfile.mkstemp(prefix=".nerve-write-check.", dir=path)
            os.close(handle)
            os.unlink(temporary)
        except OSError as error:
            raise InputError(f"{where} is not writable ({error.strerror or error}): {hint}") from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass  # made by someone else meanwhile, or not made at all
    return path


def remove_partial_writes(folder: str | os.PathLike, name: str = "") -> list[Path]:
    """Delete the temporary files that :func:`write_bytes` leaves in ``folder`` when its process is killed
    mid-write (``.<name>.<random>.tmp``; of any name when ``name`` is empty); return them. Call it only where
    no writer of this run is at work (a run's start)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    partial = [p for p in folder.glob(f".{name}*.tmp") if p.is_file()]
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent directories are created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp makes 0600
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def jsonable(value):
    """``value`` with NaN/Inf floats as None and tuples as lists, recursively (strict JSON).

    >>> jsonable({"a": float("nan"), "b": (1, 2.5)})
    {'a': None, 'b': [1, 2.5]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return jsonable(value.item())  # numpy / torch scalars
    return value


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike, frame) -> Path:
    """A pandas DataFrame as CSV (no index; NaN as an empty field)."""
    return write_text(path, frame.to_csv(index=False))


def write_figure(path: str | os.PathLike, figure, dpi: int = 100) -> Path:
    """A matplotlib Figure as PNG, rendered with the Agg canvas (never a display backend)."""
    with requires("analysis"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)  # the figures use constrained layout: nothing is cut off
    return write_bytes(path, buffer.getvalue())
