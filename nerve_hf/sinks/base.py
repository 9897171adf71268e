"""What every sink of NerveCallback offers: write one measurement, and drop what a resumed run re-measures.

A sink never stops a run: a failed write (``OSError``: a full disk, a folder that cannot be written) warns
once per kind of failure through :class:`WarnOnce` and the next measurement is tried again.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from nerve_hf.report import SpectralReport

__all__ = ["Sink", "WarnOnce"]


@runtime_checkable
class Sink(Protocol):
    """One output of the measurements (a file, a logger)."""

    def write(self, report: SpectralReport, split: str, step: int) -> None:
        """Put out one measurement: ``split`` is ``"train"``, ``"eval"``, ``"test"``, ...; ``step`` the
        Trainer's global step."""

    def drop_after(self, step: int) -> None:
        """Forget the measurements of steps after ``step`` (a run resumed from its checkpoint at ``step``)."""


class WarnOnce:
    """Warn (``RuntimeWarning``) the first time each key is given, never again for that key.

    >>> import warnings
    >>> warn = WarnOnce()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     for _ in range(3):
    ...         warn("write", "the disk is full")
    >>> [str(w.message) for w in caught]
    ['the disk is full']
    """

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
