"""The spectra archive: every measurement's eigenvalues, kept beside the metrics.

Layout: ``<output_dir>/nerve_spectra/<split>-<step, 9 digits>.npz``, one file per measurement, holding for
every measured FFN the arrays ``"<site>/pre"`` and ``"<site>/post"``: its descending covariance
eigenvalues, float32 (storage; the metrics were computed from the float64 values), and with the flow
measured (``NerveConfig.flow``) ``"<site>/input"`` and ``"<site>/output"`` too. ``nerve probe``'s
``eigenvalues.npz`` has the same keys (float64). Each file is written atomically by rank 0, so a crash
leaves a measurement whole or absent, never half; a resumed run deletes the files of steps after its
checkpoint, so no step is archived twice.

>>> import numpy as np, tempfile
>>> run = tempfile.mkdtemp()
>>> _ = write_measurement(run, "train", 20, {"ffn.0": (np.array([3.0, 1.0]), np.array([2.0, 2.0]))})
>>> frame = load_spectra(run)
>>> frame[["split", "step", "site"]].values.tolist(), frame["post"][0].tolist()
([['train', 20, 'ffn.0']], [2.0, 2.0])
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from .outputs import write_bytes

__all__ = ["ARCHIVE_DIRNAME", "spectra_npz", "write_measurement", "drop_measurements_after", "load_spectra"]

ARCHIVE_DIRNAME = "nerve_spectra"
_STAGES = ("pre", "post", "input", "output")
_NAME = re.compile(r"^(?P<split>.+)-(?P<step>\d{9})\.npz$")


def spectra_npz(eigenvalues: Mapping[str, tuple], dtype=np.float32, flow: Mapping[str, tuple] | None = None) -> bytes:
    """``{site: (pre, post)}`` as the bytes of an ``.npz`` with keys ``"<site>/pre"`` and ``"<site>/post"``;
    ``flow`` (``{site: (input, output)}``) adds ``"<site>/input"`` and ``"<site>/output"``."""
    buffer = io.BytesIO()
    arrays = {}
    for stages, spectra in ((("pre", "post"), eigenvalues), (("input", "output"), flow or {})):
        for site, values in spectra.items():
            arrays.update({f"{site}/{stage}": np.asarray(values[i], dtype=dtype) for i, stage in enumerate(stages)})
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_measurement(
    run_dir: str | os.PathLike,
    split: str,
    step: int,
    eigenvalues: Mapping[str, tuple],
    flow: Mapping[str, tuple] | None = None,
) -> Path:
    """Write one measurement's spectra (and the flow's, if given) to the run's archive, atomically; return the file."""
    path = Path(run_dir) / ARCHIVE_DIRNAME / f"{split}-{int(step):09d}.npz"
    return write_bytes(path, spectra_npz(eigenvalues, flow=flow))


def _entries(run_dir: str | os.PathLike) -> list[tuple[str, int, Path]]:
    folder = Path(run_dir) / ARCHIVE_DIRNAME
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        match = _NAME.match(path.name)
        if match:  # a writer's temporary file (".<name>.tmp") or anything else is not a measurement
            found.append((match["split"], int(match["step"]), path))
    return found


def drop_measurements_after(run_dir: str | os.PathLike, step: int) -> int:
    """Delete the archived measurements of steps after ``step`` (a resumed run re-measures them)."""
    dropped = 0
    for _, archived_step, path in _entries(run_dir):
        if archived_step > step:
            path.unlink()
            dropped += 1
    return dropped


def load_spectra(run_dir: str | os.PathLike):
    """The archive as a ``pandas.DataFrame``: one row per (split, step, site) with ``pre`` and ``post``
    eigenvalue arrays (float32, descending), sorted by split, step and site order, and ``input`` and
    ``output`` columns (NaN where a measurement has no flow) when any measurement has them. A file that
    cannot be read (a disk error) is skipped with one warning naming it."""
    import pandas as pd

    rows, unreadable = [], []
    for split, step, path in _entries(run_dir):
        try:
            with np.load(path) as data:
                sites = dict.fromkeys(key.rpartition("/")[0] for key in data.files if key.endswith("/pre"))
                rows.extend(
                    {
                        "split": split,
                        "step": step,
                        "site": site,
                        **{
                            stage: data[f"{site}/{stage}"]
                            for stage in _STAGES
                            if stage in ("pre", "post") or f"{site}/{stage}" in data.files
                        },
                    }
                    for site in sites
                )
        except (OSError, ValueError, KeyError) as error:
            unreadable.append(f"{path.name} ({type(error).__name__})")
    if unreadable:
        warnings.warn(
            f"skipped unreadable spectra files in {Path(run_dir) / ARCHIVE_DIRNAME}: {', '.join(unreadable)}",
            RuntimeWarning,
            stacklevel=2,
        )
    stages = [stage for stage in _STAGES if stage in ("pre", "post") or any(stage in row for row in rows)]
    return pd.DataFrame(rows, columns=["split", "step", "site", *stages])
