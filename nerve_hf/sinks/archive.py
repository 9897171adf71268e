"""The spectra archive: every measurement's eigenvalues, kept beside the metrics.

Layout: ``<output_dir>/nerve_spectra/<split>-<step, 9 digits>.npz``, one file per measurement, holding for
every measured FFN the arrays ``"<site>/pre"`` and ``"<site>/post"``: its descending covariance
eigenvalues, float32 (storage; the metrics were computed from the float64 values), with the flow
measured (``NerveConfig.flow``) ``"<site>/input"`` and ``"<site>/output"`` too, and with
``position_buckets`` the pre and post spectra of each bucket, ``"<site>/pos/<bucket>/pre"`` and
``".../post"`` (``bucket``: a label such as ``"0-16"`` or ``"64-inf"``; :func:`load_position_spectra` reads
them). ``nerve probe``'s ``eigenvalues.npz`` has the pre/post keys, its ``flow_eigenvalues.npz`` and
``position_eigenvalues.npz`` the others (float64). Each file is written atomically by rank 0, so a crash
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
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np

from nerve_hf.errors import requires
from nerve_hf.sinks.base import WarnOnce
from nerve_hf.sinks.files import remove_partial_writes, write_bytes

if TYPE_CHECKING:
    from nerve_hf.report import SpectralReport

__all__ = [
    "ARCHIVE_DIRNAME",
    "spectra_npz",
    "write_measurement",
    "drop_measurements_after",
    "load_spectra",
    "load_position_spectra",
    "SpectraArchiveSink",
]

ARCHIVE_DIRNAME = "nerve_spectra"
_STAGES = ("pre", "post", "input", "output")
_NAME = re.compile(r"^(?P<split>.+)-(?P<step>\d{9})\.npz$")
_POSITION_KEY = re.compile(r"^(?P<site>[^/]+)/pos/(?P<bucket>[^/]+)/pre$")


def spectra_npz(
    eigenvalues: Mapping[str, tuple],
    dtype=np.float32,
    flow: Mapping[str, tuple] | None = None,
    positions: Mapping[tuple[str, str], tuple] | None = None,
) -> bytes:
    """``{site: (pre, post)}`` as the bytes of an ``.npz`` with keys ``"<site>/pre"`` and ``"<site>/post"``;
    ``flow`` (``{site: (input, output)}``) adds ``"<site>/input"`` and ``"<site>/output"``, ``positions``
    (``{(site, bucket): (pre, post)}``) ``"<site>/pos/<bucket>/pre"`` and ``".../post"``."""
    arrays = {}
    buckets = {f"{site}/pos/{bucket}": values for (site, bucket), values in (positions or {}).items()}
    for stages, spectra in (
        (("pre", "post"), eigenvalues),
        (("input", "output"), flow or {}),
        (("pre", "post"), buckets),
    ):
        for site, values in spectra.items():
            arrays.update({f"{site}/{stage}": np.asarray(values[i], dtype=dtype) for i, stage in enumerate(stages)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_measurement(
    run_dir: str | os.PathLike,
    split: str,
    step: int,
    eigenvalues: Mapping[str, tuple],
    flow: Mapping[str, tuple] | None = None,
    positions: Mapping[tuple[str, str], tuple] | None = None,
) -> Path:
    """Write one measurement's spectra (and the flow's and position buckets', if given) to the run's archive,
    atomically; return the file."""
    path = Path(run_dir) / ARCHIVE_DIRNAME / f"{split}-{int(step):09d}.npz"
    return write_bytes(path, spectra_npz(eigenvalues, flow=flow, positions=positions))


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
    """Delete the archived measurements of steps after ``step`` (a resumed run re-measures them), and the
    partial files of writes a killed process left."""
    remove_partial_writes(Path(run_dir) / ARCHIVE_DIRNAME)
    dropped = 0
    for _, archived_step, path in _entries(run_dir):
        if archived_step > step:
            path.unlink()
            dropped += 1
    return dropped


def move_earlier_measurements(run_dir: str | os.PathLike) -> Optional[Path]:
    """Move the archived measurements of steps after 0 to a new ``<run_dir>/nerve_spectra.earlier[-N]/``;
    return that folder (None when there were none)."""
    earlier = [path for _, step, path in _entries(run_dir) if step > 0]
    if not earlier:
        return None
    base = Path(run_dir) / f"{ARCHIVE_DIRNAME}.earlier"
    aside, n = base, 1
    while aside.exists():
        n += 1
        aside = Path(f"{base}-{n}")
    aside.mkdir(parents=True)
    for path in earlier:
        path.rename(aside / path.name)
    return aside


def _read_rows(run_dir: str | os.PathLike, rows_of) -> list[dict]:
    """``rows_of(data)`` of every archived measurement, each row led by its split and step, in archive order.
    A file that cannot be read (a disk error) is skipped with one warning naming it."""
    rows, unreadable = [], []
    for split, step, path in _entries(run_dir):
        try:
            with np.load(path) as data:
                rows.extend({"split": split, "step": step, **row} for row in rows_of(data))
        except (OSError, ValueError, KeyError) as error:
            unreadable.append(f"{path.name} ({type(error).__name__})")
    if unreadable:
        warnings.warn(
            f"skipped unreadable spectra files in {Path(run_dir) / ARCHIVE_DIRNAME}: {', '.join(unreadable)}",
            RuntimeWarning,
            stacklevel=3,
        )
    return rows


def load_spectra(run_dir: str | os.PathLike):
    """The archive as a ``pandas.DataFrame``: one row per (split, step, site) with ``pre`` and ``post``
    eigenvalue arrays (float32, descending), sorted by split, step and site order, and ``input`` and
    ``output`` columns (NaN where a measurement has no flow) when any measurement has them. A file that
    cannot be read (a disk error) is skipped with one warning naming it."""
    with requires("analysis"):
        import pandas as pd

    def rows_of(data) -> list[dict]:
        sites = dict.fromkeys(
            key.rpartition("/")[0] for key in data.files if key.endswith("/pre") and not _POSITION_KEY.match(key)
        )
        return [
            {
                "site": site,
                **{
                    stage: data[f"{site}/{stage}"]
                    for stage in _STAGES
                    if stage in ("pre", "post") or f"{site}/{stage}" in data.files
                },
            }
            for site in sites
        ]

    rows = _read_rows(run_dir, rows_of)
    stages = [stage for stage in _STAGES if stage in ("pre", "post") or any(stage in row for row in rows)]
    return pd.DataFrame(rows, columns=["split", "step", "site", *stages])


def load_position_spectra(run_dir: str | os.PathLike):
    """The position buckets' spectra of the archive (``position_buckets``) as a ``pandas.DataFrame``: one row
    per (split, step, site, bucket) with ``pre`` and ``post`` eigenvalue arrays (float32, descending), in
    archive order; empty when no measurement has buckets. Unreadable files are skipped as by
    :func:`load_spectra`.

    >>> import numpy as np, tempfile
    >>> run = tempfile.mkdtemp()
    >>> buckets = {("ffn.0", "0-16"): (np.array([2.0, 1.0]), np.array([1.5, 1.5]))}
    >>> _ = write_measurement(run, "eval", 20, {"ffn.0": (np.ones(2), np.ones(2))}, positions=buckets)
    >>> frame = load_position_spectra(run)
    >>> frame[["split", "step", "site", "bucket"]].values.tolist(), frame["pre"][0].tolist()
    ([['eval', 20, 'ffn.0', '0-16']], [2.0, 1.0])
    """
    with requires("analysis"):
        import pandas as pd

    def rows_of(data) -> list[dict]:
        found = [match for match in map(_POSITION_KEY.match, data.files) if match]
        return [
            {"site": m["site"], "bucket": m["bucket"], "pre": data[m.string], "post": data[m.string[:-3] + "post"]}
            for m in found
        ]

    return pd.DataFrame(_read_rows(run_dir, rows_of), columns=["split", "step", "site", "bucket", "pre", "post"])


class SpectraArchiveSink:
    """Archives every measurement's spectra (pre/post, and the flow's and position buckets' when the report
    has them) in ``<run_dir>/nerve_spectra/`` with :func:`write_measurement`; a report without spectra writes
    nothing, and a failed write warns once while later measurements are tried again.

    >>> import tempfile, torch
    >>> from nerve_hf.report import SpectralReport
    >>> run = tempfile.mkdtemp()
    >>> sink = SpectraArchiveSink(run)
    >>> for step in (2, 4):
    ...     sink.write(SpectralReport(eigenvalues={"ffn.0": (torch.ones(2), torch.ones(2))}), "train", step)
    >>> sink.drop_after(2)
    >>> load_spectra(run)[["split", "step", "site"]].values.tolist()
    [['train', 2, 'ffn.0']]
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._warn = WarnOnce()

    def write(self, report: SpectralReport, split: str, step: int) -> None:
        if not report.eigenvalues:
            return
        try:
            write_measurement(
                self.run_dir, split, step, report.eigenvalues, report.flow_eigenvalues, report.position_eigenvalues
            )
        except OSError as error:
            self._warn(
                "archive",
                f"NerveCallback: spectra are not being written to {self.run_dir / ARCHIVE_DIRNAME} "
                f"({type(error).__name__}: {error}); the metrics still are. Later measurements are tried again.",
            )

    def drop_after(self, step: int) -> None:
        """A training run starts at ``step``: started afresh (0), the measurements an earlier run archived
        after step 0 are moved to ``nerve_spectra.earlier[-N]/`` with one warning; then what comes after
        ``step`` is dropped (a resumed run measures it again)."""
        try:
            if step == 0:
                moved = move_earlier_measurements(self.run_dir)
                if moved is not None:
                    self._warn(
                        "earlier",
                        f"NerveCallback: {self.run_dir / ARCHIVE_DIRNAME} held the spectra of an earlier run; "
                        f"moved to {moved.name}/ (load_spectra reads one run per folder)",
                    )
            drop_measurements_after(self.run_dir, step)
        except OSError as error:
            self._warn(
                "drop",
                f"NerveCallback: could not drop the spectra after step {step} in {self.run_dir} "
                f"({type(error).__name__}: {error}); a step may be archived twice",
            )
