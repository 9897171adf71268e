"""Measurement windows of an :class:`nerve_hf.FFNTracker`: which forwards count, and what they added up.

A tracker hooks each FFN once and feeds one or more windows. At the start of every top-level forward
the first window whose ``when`` accepts it records that forward (at most one window per forward); a
window keeps, per site, a pre and a post :class:`~nerve_hf.stats.covariance.CovarianceAccumulator` and the
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
from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.stats.cross_covariance import CrossCovarianceAccumulator

__all__ = ["Window", "SiteWindow"]


class SiteWindow:
    """One site's statistics in one window: pre/post accumulators and the rows offered to each.

    Optional, when the tracker asks for them (each ``None``/empty otherwise):

    * ``input``/``output``: accumulators of the FFN's d-wide input (the up projection's input) and output
      (the down projection's output), the stages of the tracker's ``flow``.
    * ``buckets``: one (pre, post) pair per position bucket of the tracker's ``position_buckets``.
    """

    def __init__(
        self,
        site: ResolvedSite,
        dim: Optional[int],
        device=None,
        stages: Sequence[str] = (),
        stage_dims: Optional[dict] = None,
        buckets: int = 0,
    ) -> None:
        self.site = site
        self.device = device  # where the float64 state lives; None: the activations' device
        self.pre: Optional[CovarianceAccumulator] = None
        self.post: Optional[CovarianceAccumulator] = None
        self.stages = tuple(stages)  # extra d-wide stages recorded: a subset of ("input", "output")
        self.input: Optional[CovarianceAccumulator] = None
        self.output: Optional[CovarianceAccumulator] = None
        self.n_buckets = int(buckets)
        self.buckets: list[tuple[CovarianceAccumulator, CovarianceAccumulator]] = []
        self.offered = self._no_rows()  # rows offered this window (for max_tokens)
        if dim is not None:
            self.allocate(dim)
        for stage in self.stages:
            width = (stage_dims or {}).get(stage)
            if width is not None:
                self.allocate_stage(stage, width)

    def _no_rows(self) -> dict:
        return {"pre": 0, "post": 0, **{stage: 0 for stage in self.stages}}

    @property
    def dim(self) -> Optional[int]:
        return self.pre.dim if self.pre is not None else None

    def allocate(self, dim: int) -> None:
        """Accumulators of width ``dim`` (they hold no memory before their first rows)."""
        self.pre, self.post = CovarianceAccumulator(dim, self.device), CovarianceAccumulator(dim, self.device)
        self.buckets = [
            (CovarianceAccumulator(dim, self.device), CovarianceAccumulator(dim, self.device))
            for _ in range(self.n_buckets)
        ]

    def allocate_stage(self, stage: str, width: int) -> None:
        """The ``input`` or ``output`` accumulator, ``width`` wide."""
        setattr(self, stage, CovarianceAccumulator(width, self.device))

    def accumulator(self, side: str) -> CovarianceAccumulator:
        return self.pre if side == "pre" else self.post if side == "post" else getattr(self, side)

    def reset(self) -> None:
        for acc in (self.pre, self.post, self.input, self.output, *(a for pair in self.buckets for a in pair)):
            if acc is not None:
                acc.reset()
        self.offered = self._no_rows()


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
        self.device = None  # where the float64 state lives (see bind)
        self.pairs: list[tuple[int, int]] = []  # site index pairs with a cross-covariance of their inputs
        self.cross: dict = {}  # (i, j) -> CrossCovarianceAccumulator, once both widths are known
        self.cross_offered: dict = {}  # (i, j) -> row pairs offered this window (for max_tokens)
        self.groups: list[list[int]] = []  # site indices of each round-robin group
        self.active: frozenset[int] = frozenset()  # site indices watched now
        self.confirmed = False

    def bind(
        self,
        sites: Sequence[ResolvedSite],
        dims: Sequence[Optional[int]],
        device=None,
        stages: Sequence[str] = (),
        stage_dims: Optional[Sequence[dict]] = None,
        buckets: int = 0,
        pairs: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Create the per-site statistics (float64 state on ``device``; None: the activations') and the
        round-robin groups for the tracker's sites; ``stages``, ``stage_dims`` (per site: stage -> width
        or None), ``buckets`` as for :class:`SiteWindow`; ``pairs``: site index pairs (i, j) whose FFN
        inputs get a cross-covariance (allocated once both widths are known, :meth:`cross_for`)."""
        stage_dims = stage_dims or [{} for _ in sites]
        self.states = [
            SiteWindow(site, dim, device, stages, widths, buckets) for site, dim, widths in zip(sites, dims, stage_dims)
        ]
        self.device = device
        self.pairs = list(pairs)
        self.cross: dict[tuple[int, int], CrossCovarianceAccumulator] = {}
        self.cross_offered: dict[tuple[int, int], int] = {}
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

    def cross_for(self, pair: tuple[int, int], dim_x: int, dim_y: int) -> CrossCovarianceAccumulator:
        """The cross-covariance of ``pair``'s inputs, allocated on first use."""
        acc = self.cross.get(pair)
        if acc is None:
            acc = self.cross[pair] = CrossCovarianceAccumulator(dim_x, dim_y, self.device)
        return acc

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

    def _reset_states(self) -> None:
        for state in self.states:
            state.reset()
        for acc in self.cross.values():
            acc.reset()
        self.cross_offered = {}

    def __repr__(self) -> str:
        return f"Window({self.name!r}, staged={self.staged}, groups={len(self.groups)})"
