"""Measurement windows of an :class:`nerve_hf.FFNTracker`: which forwards count, and what they added up.

A tracker hooks each FFN once and feeds one or more windows. At the start of every top-level forward
the first window whose ``when`` accepts it records that forward (at most one window per forward); a
window holds its own measurements' state (a
:class:`~nerve_hf.tracking.measurements.base.MeasurementCollection`) and its ``max_tokens`` count (a
:class:`~nerve_hf.tracking.tokens.TokenCap`). A window can also watch a rotating subset of the sites
(``layers_per_step`` blocks at a time) and be *staged*: until :meth:`Window.commit`, each recorded
forward replaces what the window held.

The Trainer callback uses one tracker with two windows: ``train`` (train-mode forwards of a measured
step) and ``eval`` (staged eval-mode forwards outside training steps).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

from torch import nn

from model_adapters import ResolvedSite
from nerve_hf.tracking.measurements.base import MeasurementCollection
from nerve_hf.tracking.tokens import TokenCap

__all__ = ["Window", "SiteWindow", "WindowLostError", "skipped_message", "warn_skipped"]


class WindowLostError(RuntimeError):
    """A window cannot be measured: recording into it failed (here or on another process)."""


class SiteWindow:
    """One site's accumulators in one window, for inspection: ``pre``, ``post`` (None until the width is
    known), and where the tracker measures them ``input``, ``output`` (flow) and ``buckets`` (one
    (pre, post) pair per position bucket); None or empty otherwise."""

    def __init__(self, measurements: MeasurementCollection, index: int) -> None:
        self._parts = measurements.accumulators(index)

    pre = property(lambda self: self._parts.get("pre"))
    post = property(lambda self: self._parts.get("post"))
    input = property(lambda self: self._parts.get("input"))
    output = property(lambda self: self._parts.get("output"))
    buckets = property(lambda self: self._parts.get("buckets") or [])

    @property
    def dim(self) -> Optional[int]:
        return self.pre.dim if self.pre is not None else None


class Window:
    """Which top-level forwards a tracker window records, and their statistics.

    Args:
        name: how the tracker's ``compute``/``reset``/``commit``/``rotate`` calls name the window.
        when: called with the unwrapped model at the start of each top-level forward; the window records
            it if it returns True. ``None``: every forward.
        keep_samples: called with the batch size B of each recorded forward; how many leading samples
            count (``None``: all). The Trainer callback leaves out a distributed sampler's padding repeats.
        staged: until :meth:`commit` confirms the window, each recorded forward replaces what it held
            (it is reset as the forward begins); after it, forwards add up until :meth:`reset`.
        layers_per_step: watch this many blocks at a time, in groups of consecutive blocks; :meth:`rotate`
            picks the group. ``None``: every site of the tracker, always.
    """

    def __init__(
        self,
        name: str = "default",
        when: Optional[Callable[[nn.Module], bool]] = None,
        keep_samples: Optional[Callable[[int], Optional[int]]] = None,
        staged: bool = False,
        layers_per_step: Optional[int] = None,
    ) -> None:
        self.name = name
        self.when = when
        self.keep_samples = keep_samples
        self.staged = bool(staged)
        self.layers_per_step = layers_per_step
        self.measurements: Optional[MeasurementCollection] = None  # this window's state (see bind)
        self.cap = TokenCap(None)  # max_tokens of this window
        self.groups: list[list[int]] = []  # site indices of each round-robin group
        self.active: frozenset[int] = frozenset()  # site indices watched now
        self.confirmed = False
        self.failed: Optional[str] = None  # why recording into this window failed since its last reset
        self._sites = 0  # how many sites the tracker has (see bind)

    def bind(self, sites: Sequence[ResolvedSite], measurements: MeasurementCollection, cap: TokenCap) -> None:
        """Give the window its measurements (their state is this window's), its token cap, and the
        round-robin groups of the tracker's sites."""
        self.measurements, self.cap = measurements, cap
        every = list(range(len(sites)))
        if self.layers_per_step is None:
            self.groups = [every]
        else:
            blocks = sorted({site.layer for site in sites})
            size = self.layers_per_step
            self.groups = [
                [i for i in every if sites[i].layer in blocks[start : start + size]]
                for start in range(0, len(blocks), size)
            ]
        self.active = frozenset(self.groups[0])
        self._sites = len(sites)

    @property
    def states(self) -> list[SiteWindow]:
        """Per site, a view of its accumulators in this window."""
        return [SiteWindow(self.measurements, i) for i in range(self._sites)] if self.measurements else []

    @property
    def cross(self) -> dict:
        """``cross_layer``: (i, j) -> the cross-covariance of sites i and j's inputs (once recorded)."""
        found = self.measurements.get("cross_layer") if self.measurements else None
        return found.cross if found is not None else {}

    def accepts(self, model: nn.Module) -> bool:
        return self.when is None or bool(self.when(model))

    def watches(self, index: int) -> bool:
        return self.layers_per_step is None or index in self.active

    def begin_forward(self) -> None:
        """A recorded forward begins: an unconfirmed staged window forgets what it held."""
        if self.staged and not self.confirmed:
            self._reset_states()

    def rotate(self, turn: int) -> None:
        """Watch round-robin group ``turn`` (mod the number of groups)."""
        self.active = frozenset(self.groups[turn % len(self.groups)])

    def commit(self) -> None:
        """Staged window: confirm it, so that later forwards add to it until :meth:`reset`."""
        self.confirmed = True

    def reset(self) -> None:
        """Forget every row (the watched group stays)."""
        self._reset_states()
        self.confirmed = False

    def fail(self, reason: str) -> None:
        """A hook failed while recording into this window: its rows are incomplete until :meth:`reset`."""
        if self.failed is None:
            self.failed = reason

    def _reset_states(self) -> None:
        self.failed = None
        if self.measurements is not None:
            self.measurements.reset()
        self.cap.reset()

    def __repr__(self) -> str:
        return f"Window({self.name!r}, staged={self.staged}, groups={len(self.groups)})"


_STAGE_ORDER = {"input": 0, "pre": 1, "post": 2, "output": 3}  # the order rows flow through an FFN


Skipped = dict[int, dict[str, int]]  # site index -> {what (a stage): rows skipped}


def skipped_message(window: str, sites: Sequence[ResolvedSite], skipped: Skipped, where: str = "") -> str:
    """The one line that says which rows of a measurement were skipped for holding NaN or Inf.

    ``skipped``: site index -> {what (a stage): rows} (:meth:`MeasurementCollection.skipped_rows`); a site's
    count is its largest (the same rows reach several stages).

    >>> from types import SimpleNamespace
    >>> sites = [SimpleNamespace(site="ffn.0"), SimpleNamespace(site="ffn.1")]
    >>> skipped_message("train", sites, {1: {"input": 2, "pre": 2, "post": 1}})
    "non-finite activations skipped: 2 rows holding NaN or Inf at 1 site in window 'train' (ffn.1: 2 rows; \
input 2, pre 2, post 1); every statistic covers only its finite rows (a row's tokens count them)"
    """
    parts, total = [], 0
    for i, counts in sorted(skipped.items()):
        rows = max(counts.values())
        total += rows
        named = sorted(counts.items(), key=lambda item: (_STAGE_ORDER.get(item[0], len(_STAGE_ORDER)), item[0]))
        parts.append(f"{sites[i].site}: {rows} rows; " + ", ".join(f"{name} {n}" for name, n in named))
    noun = "site" if len(parts) == 1 else "sites"
    return (
        f"non-finite activations skipped{where}: {total} rows holding NaN or Inf at {len(parts)} {noun} in window "
        f"{window!r} ({'; '.join(parts)}); every statistic covers only its finite rows (a row's tokens count them)"
    )


def warn_skipped(window: Window, sites: Sequence[ResolvedSite], skipped: Skipped, where: str = "") -> None:
    """One RuntimeWarning per measurement of ``window`` for all its skipped rows (none when nothing was
    skipped); ``where`` qualifies the counts (``" on this process"`` under several processes)."""
    if skipped:
        warnings.warn(skipped_message(window.name, sites, skipped, where), RuntimeWarning, stacklevel=3)
