"""Measurement windows of an :class:`nerve_hf.FFNTracker`: which forwards count, and what they added up.

A tracker hooks each FFN once and feeds one or more windows. At the start of every top-level forward
the first window whose ``when`` accepts it records that forward (at most one window per forward); a
window keeps, per site, a pre and a post :class:`~nerve_hf.covariance.CovarianceAccumulator` and the
rows offered to them (for ``max_tokens``). A window can also watch a rotating subset of the sites
(``layers_per_step`` blocks at a time) and be *staged*: until :meth:`Window.commit`, each recorded
forward replaces what the window held.

The Trainer callback uses one tracker with two windows: ``train`` (train-mode forwards of a measured
step) and ``eval`` (staged eval-mode forwards outside training steps).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import nn

from model_adapters import ResolvedSite

from .covariance import CovarianceAccumulator

__all__ = ["Window", "SiteWindow"]


class SiteWindow:
    """One site's statistics in one window: pre/post accumulators and the rows offered to each."""

    def __init__(self, site: ResolvedSite, dim: Optional[int], device=None) -> None:
        self.site = site
        self.device = device  # where the float64 state lives; None: the activations' device
        self.pre: Optional[CovarianceAccumulator] = None
        self.post: Optional[CovarianceAccumulator] = None
        self.offered = {"pre": 0, "post": 0}  # rows offered this window (for max_tokens)
        if dim is not None:
            self.allocate(dim)

    @property
    def dim(self) -> Optional[int]:
        return self.pre.dim if self.pre is not None else None

    def allocate(self, dim: int) -> None:
        """Accumulators of width ``dim`` (they hold no memory before their first rows)."""
        self.pre, self.post = CovarianceAccumulator(dim, self.device), CovarianceAccumulator(dim, self.device)

    def accumulator(self, side: str) -> CovarianceAccumulator:
        return self.pre if side == "pre" else self.post

    def reset(self) -> None:
        for acc in (self.pre, self.post):
            if acc is not None:
                acc.reset()
        self.offered = {"pre": 0, "post": 0}


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
        self.states: list[SiteWindow] = []
        self.groups: list[list[int]] = []  # site indices of each round-robin group
        self.active: frozenset[int] = frozenset()  # site indices watched now
        self.confirmed = False

    def bind(self, sites: Sequence[ResolvedSite], dims: Sequence[Optional[int]], device=None) -> None:
        """Create the per-site statistics (float64 state on ``device``; None: the activations') and the
        round-robin groups for the tracker's sites."""
        self.states = [SiteWindow(site, dim, device) for site, dim in zip(sites, dims)]
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

    def accepts(self, model: nn.Module) -> bool:
        return self.when is None or bool(self.when(model))

    def watches(self, index: int) -> bool:
        return self.layers_per_step is None or index in self.active

    def begin_forward(self) -> None:
        """A recorded forward begins: an unconfirmed staged window forgets what it held."""
        if self.staged and not self.confirmed:
            for state in self.states:
                state.reset()

    def rotate(self, turn: int) -> None:
        """Watch round-robin group ``turn`` (mod the number of groups)."""
        self.active = frozenset(self.groups[turn % len(self.groups)])

    def commit(self) -> None:
        """Staged window: confirm it, so that later forwards add to it until :meth:`reset`."""
        self.confirmed = True

    def reset(self) -> None:
        """Forget every row (the watched group stays)."""
        for state in self.states:
            state.reset()
        self.confirmed = False

    def __repr__(self) -> str:
        return f"Window({self.name!r}, staged={self.staged}, groups={len(self.groups)})"
