"""FFNTracker: the front door that composes hook points, token sources, windows, measurements and a reducer.

* :mod:`nerve_hf.tracking.points`: resolves the FFN sites and hooks them, only at the stages some
  measurement needs; the token accounting rules (top-level forward gate, gradient-checkpoint recompute
  ignored, mask selection, OPT's flat rows, ``max_tokens`` keeping the same rows for pre and post) are
  written down there and in :mod:`nerve_hf.tracking.tokens`.
* :mod:`nerve_hf.tracking.measurements`: one object per feature (pre/post, flow, position buckets,
  cross-layer, or your own), composed per window (:mod:`nerve_hf.tracking.windows`).
* :mod:`nerve_hf.tracking.reducers`: how statistics are reduced across processes; :mod:`nerve_hf.tracking.budget`:
  the memory budget.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

import model_adapters
from model_adapters import Adapter, ResolvedSite
from nerve_hf import spectra as spectra_module  # compute()'s argument `spectra` hides the module name
from nerve_hf.measurement_options import MEASUREMENT_DEFAULTS
from nerve_hf.options import boolean, device, optional, positive_number, token_cap
from nerve_hf.parallel.comm import is_distributed
from nerve_hf.parallel.tensor_parallel import data_parallel_group
from nerve_hf.report import SpectralReport
from nerve_hf.tracking.budget import MemoryBudgetError, check_memory_budget, covariance_state_bytes
from nerve_hf.tracking.call_inputs import check_no_replicating_data_parallel
from nerve_hf.tracking.measurements.base import ComputeContext, Measurement, MeasurementCollection
from nerve_hf.tracking.measurements.cross_layer import CROSS_LAYER_CHOICES, CrossLayer, layer_pairs
from nerve_hf.tracking.measurements.experts import Experts
from nerve_hf.tracking.measurements.flow import Flow
from nerve_hf.tracking.measurements.positions import PositionBuckets, check_buckets
from nerve_hf.tracking.measurements.prepost import PrePost
from nerve_hf.tracking.points import FFNHookPoints, resolve_sites
from nerve_hf.tracking.reducers import choose_reducer
from nerve_hf.tracking.stack_tokens import sources_for_sites
from nerve_hf.tracking.tokens import TokenCap, TokenSource
from nerve_hf.tracking.windows import SiteWindow, Window, WindowLostError, warn_skipped

__all__ = ["FFNTracker", "MemoryBudgetError", "Window", "WindowLostError", "covariance_state_bytes"]


class FFNTracker:
    """Covariance eigenspectra of FFN pre/post-activations over a measurement window.

    Args:
        model: any model the adapters understand, possibly wrapped (DDP, ``torch.compile``, FSDP,
            checkpoint wrappers): sites are resolved on the unwrapped model. ``nn.DataParallel`` over
            several devices raises ValueError (use DDP).
        adapter: where the FFNs are; ``None`` asks :func:`model_adapters.get_adapter`.
        layers: block indices to track (negative counts from the end); ``None`` tracks all.
        max_tokens: per site, count at most this many tokens per window (first come); ``None``: all.
        when: which top-level forwards count (e.g. ``lambda m: not m.training``); ``None``: all. With
            ``keep_samples`` and ``staged``, the one window's options (see :class:`nerve_hf.tracking.windows.Window`).
        keep_samples: how many leading samples of each counted forward count (a function of its batch size).
        staged: keep only the last forward until :meth:`commit`.
        windows: several named :class:`~nerve_hf.tracking.windows.Window` s instead (then leave ``when``,
            ``keep_samples``, ``staged`` unset); each forward is recorded by the first that accepts it,
            and :meth:`compute`, :meth:`reset`, :meth:`commit`, :meth:`rotate` take the window's name.
        group: the data-parallel process group whose statistics :meth:`compute` sums (default: every
            process). Its processes then share the eigendecompositions (:mod:`nerve_hf.parallel.sharded_spectra`).
        site_sharded: under several processes, each process owns about 1/W of the FFNs (balanced by D²,
            :func:`~nerve_hf.parallel.sharded_spectra.assign_owners`), keeps state only for them and measures them on
            its own tokens: a per-site token subsample, with each row's ``tokens`` saying how many. Nothing
            is reduced; the rows are gathered so every process reports every FFN. ``flow`` and
            ``position_buckets`` work the same way (the owner measures its FFNs' stages and buckets);
            ``cross_layer`` is refused, as the two layers of a pair may have different owners.
        state_device: where the float64 state lives (``"cpu"``: host memory, for FFNs whose state does not
            fit beside the model); ``None``: the activations' device.
        memory_budget_mb: refuse (:class:`MemoryBudgetError`, a ``ValueError``) at construction, before
            anything is allocated, when the float64 covariance state of one window's watched FFNs
            (its largest round-robin group), 2 × (D² + D) × 8 bytes each, would exceed this many MiB;
            ``None``: no limit. With the options below the state per FFN is
            ``[(1 + B) × 2 × (D² + D) + s × (d² + d)] × 8`` bytes, plus ``(d² + 2d) × 8`` per layer pair,
            for B position buckets and s = 2 with ``flow`` (input, output), 1 with only ``cross_layer``.
            :meth:`compute` needs, transiently, about 4 x min(that state, 1 GiB or one FFN's D² x 8).
        flow: (on by default, as for the callback and the probe: one default in
            :data:`~nerve_hf.measurement_options.MEASUREMENT_DEFAULTS`) also the d-wide FFN input (the up/gate
            projection's input) and output (the down projection's output): rows gain
            :data:`~nerve_hf.tracking.measurements.flow.FLOW_KEYS` (SE/PR/EEE per stage, JS input -> pre and
            post -> output over zero-padded spectra) and the report ``flow_eigenvalues``.
        position_buckets: strictly increasing token positions ``[0, 16, 64, ...]``: one (pre, post) pair
            of accumulators per bucket [e_i, e_{i+1}) (the last is open) beside the overall pair, reported in
            ``report.positions``. A token's position is the number of real (``attention_mask``) tokens before
            it in its sequence, so left padding does not shift it; without a mask, its index in the sequence.
        cross_layer: ``"adjacent"`` (consecutive tracked layers of a family) or ``"all"`` (every pair):
            ``report.cross_layer`` rows with JS between the two layers' pre spectra and post spectra and
            the linear CKA of their FFN inputs, from a streaming cross-covariance per pair; ``None``: off.
        measurements: more :class:`~nerve_hf.tracking.measurements.base.Measurement` s beside those the
            options above build, each a class or factory (called once per window) or an instance (it
            serves the first window; every other window gets a copy).
        token_source: the :class:`~nerve_hf.tracking.tokens.TokenSource` deciding which rows of every
            site count; ``None``: each site's own, by the name its stack gives in the adapter
            (:mod:`nerve_hf.tracking.stack_tokens`; single-stack models: the call's ``attention_mask``).
            An unknown name raises ValueError here.
        experts: MoE models: measure only these routed experts (indices, in every MoE layer); ``None``: all.
        experts_per_step: MoE models: measure a share of this many routed experts per window, the next
            share after each :meth:`reset` (the expert round-robin); ``None``: all. The state per measured
            expert is 2 × (F² + F) × 8 bytes, counted by ``memory_budget_mb``.

    Use as a context manager; hooks exist only inside ``with tracker:`` and are removed on exit, also
    when an exception leaves the block. Accumulated statistics persist across ``with`` blocks until
    :meth:`reset`. :meth:`compute` is collective under ``torch.distributed``: call it on every rank.

    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4)
    ...     def forward(self, x):
    ...         return x + self.fc2(self.act(self.fc1(x)))
    >>> model = nn.Sequential(Block(), Block())
    >>> tracker = FFNTracker(model)
    >>> with tracker:
    ...     _ = model(torch.randn(2, 5, 4))
    >>> [(row["site"], row["tokens"]) for row in tracker.compute().rows]
    [('ffn.0', 10), ('ffn.1', 10)]
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter | None = None,
        layers: Iterable[int] | None = None,
        max_tokens: int | None = None,
        when: Callable[[nn.Module], bool] | None = None,
        memory_budget_mb: float | None = None,
        keep_samples: Callable[[int], int | None] | None = None,
        staged: bool = False,
        windows: Sequence[Window] | None = None,
        group=None,
        site_sharded: bool = False,
        state_device: torch.device | str | None = None,
        flow: bool = MEASUREMENT_DEFAULTS["flow"],
        position_buckets: Sequence[int] | None = None,
        cross_layer: str | None = None,
        measurements: Sequence[Measurement | Callable[[], Measurement]] = (),
        token_source: TokenSource | None = None,
        experts: Sequence[int] | None = None,
        experts_per_step: int | None = None,
    ) -> None:
        self._experts_options = {"experts": experts, "experts_per_step": experts_per_step}
        Experts(**self._experts_options)  # refuses bad options before anything is resolved
        max_tokens = optional(token_cap)("max_tokens", max_tokens)  # the checks NerveConfig's fields use
        self.flow = boolean("flow", flow)
        state_device = optional(device)("state_device", state_device)  # parses and exists here
        self.position_buckets = check_buckets(position_buckets)
        if cross_layer is not None and cross_layer not in CROSS_LAYER_CHOICES:
            raise ValueError(f"cross_layer must be one of {CROSS_LAYER_CHOICES} or None, got {cross_layer!r}")
        self.cross_layer = cross_layer
        self.memory_budget_mb = optional(positive_number)("memory_budget_mb", memory_budget_mb)
        check_no_replicating_data_parallel(model)
        self.model = model
        self.root = model_adapters.unwrap_model(model)  # sites are resolved here
        self.adapter = adapter if adapter is not None else model_adapters.get_adapter(self.root)
        self.max_tokens = max_tokens
        if windows is None:
            windows = [Window(when=when, keep_samples=keep_samples, staged=staged)]
        elif when is not None or keep_samples is not None or staged:
            raise TypeError("pass when/keep_samples/staged or windows, not both")
        if len({w.name for w in windows}) != len(windows) or not windows:
            raise ValueError(f"windows need distinct names, got {[w.name for w in windows]}")
        self._windows = {window.name: window for window in windows}
        self._table, layouts = resolve_sites(self.root, self.adapter, layers, state_device)
        _warn_unmeasured_towers(self.root, self._table.sites)
        # Tensor-parallel FFNs: statistics are summed over the data-parallel group of their mesh.
        sharded = [layout for pair in layouts for layout in pair.values() if layout is not None]
        self.group = data_parallel_group(sharded) if sharded and group is None else group
        self._layer_pairs = layer_pairs(self._table.sites, cross_layer)
        self._reducer = choose_reducer(self.group, site_sharded, self._table.dims, bool(self._layer_pairs))
        parts = [
            self._option_measurements() + [_instance(extra, k) for extra in measurements] for k in range(len(windows))
        ]
        for window, window_parts in zip(windows, parts):  # made before any is bound: copies hold no table
            window.bind(self._table.sites, MeasurementCollection(window_parts, self._table), TokenCap(max_tokens))
        self._check_budget()
        # Each site's token source: token_source for all, else the source its stack names in the table.
        tokens_for = sources_for_sites(self.root, self._table.sites, token_source)
        self.points = FFNHookPoints(
            model,
            self.root,
            self._table,
            layouts,
            self._windows,
            stages=set().union(*(window.measurements.stages for window in windows)),
            owns=self._reducer.owns,
            tokens_for=tokens_for,
            on_width=self._check_budget,
        )

    def _option_measurements(self) -> list[Measurement]:
        """One window's measurements, as the keyword options ask (a new feature registers here)."""
        flow = Flow() if self.flow else None
        return [
            PrePost(),
            *([flow] if flow else []),
            *([PositionBuckets(self.position_buckets)] if self.position_buckets is not None else []),
            *([CrossLayer(self._layer_pairs, inputs=flow)] if self._layer_pairs else []),
            *([Experts(**self._experts_options)] if any(s.kind == "expert" for s in self._table.sites) else []),
        ]

    def _check_budget(self) -> None:
        """MemoryBudgetError if one window's largest group of FFNs needs more state than the budget."""
        check_memory_budget(self.memory_budget_mb, list(self._windows.values()), self._owns, self._table.dims)

    def _owns(self, index: int) -> bool:
        """Whether this process measures site ``index`` (always, unless site-sharded)."""
        return self._reducer.owns(index)

    @property
    def _dims(self) -> list[int | None]:
        """D of each site (None until known)."""
        return self._table.dims

    @property
    def sites(self) -> list[ResolvedSite]:
        """The tracked sites, in report order."""
        return list(self._table.sites)

    def window(self, name: str | None = None) -> Window:
        """The window called ``name`` (``None``: the first)."""
        if name is None:
            return next(iter(self._windows.values()))
        if name not in self._windows:
            raise KeyError(f"no window {name!r}; this tracker has {sorted(self._windows)}")
        return self._windows[name]

    @property
    def _states(self) -> list[SiteWindow]:
        """The first window's per-site accumulators."""
        return self.window().states

    @property
    def active(self) -> bool:
        """True while the hooks are attached."""
        return self.points.active

    def attach(self) -> "FFNTracker":
        """Register the hooks (what ``__enter__`` does)."""
        self.points.attach()
        return self

    def detach(self) -> None:
        """Remove every hook (what ``__exit__`` does); safe to call twice."""
        self.points.detach()

    def __enter__(self) -> "FFNTracker":
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def reset(self, window: str | None = None) -> None:
        """Start a new measurement in ``window`` (default: the first; hooks stay as they are)."""
        self.window(window).reset()

    def commit(self, window: str | None = None) -> None:
        """Staged window: confirm it, so that later forwards add to it until :meth:`reset`."""
        self.window(window).commit()

    def rotate(self, turn: int, window: str | None = None) -> None:
        """Round-robin window: watch group ``turn`` (mod the number of groups) from now on."""
        self.window(window).rotate(turn)

    def compute(
        self,
        metrics: str = "all",
        window: str | None = None,
        spectra_dtype: str = "float64",
        extra_metrics: bool = False,
        spectra: str = "exact",
    ) -> SpectralReport:
        """Metrics of every site the window watches, over what it recorded so far, synced across processes.

        Collective under ``torch.distributed``: every rank must call it. The window keeps its
        statistics; call :meth:`reset` to start a new measurement. If a hook failed while the window
        recorded (on any process: an allocation failure, ...), every process raises
        :class:`WindowLostError` here, after agreeing on it: the window's rows are incomplete.

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> _ = torch.manual_seed(0)
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50))
        >>> batch = {"input_ids": torch.randint(0, 50, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
        >>> batch["attention_mask"][1, 10:] = 0  # padded positions are never counted
        >>> with FFNTracker(model) as tracker, torch.no_grad():
        ...     _ = model(**batch)
        >>> report = tracker.compute()
        >>> [(row["site"], row["dim"], row["tokens"]) for row in report.rows]
        [('ffn.0', 128, 26), ('ffn.1', 128, 26)]
        >>> all(1 <= row["pr_pre"] <= row["dim"] and 0 <= row["js"] <= 0.6932 for row in report.rows)
        True
        >>> fast = tracker.compute(metrics="pr")  # PR from the trace identity, no eigendecomposition
        >>> abs(fast.rows[0]["pr_pre"] / report.rows[0]["pr_pre"] - 1) < 1e-5, fast.eigenvalues  # fp32 round-off
        (True, {})

        Args:
            metrics: ``"all"``: eigendecompose every covariance, all seven metrics and the eigenvalues.
                ``"pr"``: only ``pr_pre`` and ``pr_post``, from the identity PR = tr(Σ)² / ‖Σ‖²_F with no
                eigendecomposition (O(D²) instead of O(D³)); the other metrics are NaN and the report
                carries no eigenvalues.
            window: which window (default: the first).
            extra_metrics: also :data:`nerve_hf.extra_metrics.EXTRA_METRIC_NAMES` in every row (effective and
                stable rank, α-ReQ exponent, finite-sample-corrected PR), from the same eigenvalues.
            spectra_dtype: ``"float64"`` (default) or ``"float32"`` eigendecompositions; float32 is faster
                on CPUs, and its error on real activation spectra is measured in
                ``benchmarks/results/perf/spectra_precision_cpu.json``.
            spectra: ``"exact"`` (default) or ``"estimate"``: FFNs at least
                :data:`nerve_hf.spectra.estimate.ESTIMATE_MIN_DIM` wide get SE, EEE and JS from stochastic
                Lanczos quadrature and the top-k eigenvalues instead of a full eigendecomposition (PR stays
                exact; the error is measured in ``benchmarks/results/perf/spectra_estimate_cpu.md``); narrower
                ones are decomposed exactly.
        """
        metrics = spectra_module.metric_set(metrics, spectra)
        if metrics not in spectra_module.METRIC_SETS:
            raise ValueError(f"metrics must be one of {spectra_module.METRIC_SETS}, got {metrics!r}")
        chosen = self.window(window)
        self._reducer.lost = chosen.failed  # sent with the rows: every process raises at the same point
        if chosen.failed is not None and not self._reducer.exchanges():
            raise WindowLostError(f"window {chosen.name!r} lost rows: {chosen.failed}")
        watched = [i for i in range(len(self._table.sites)) if chosen.watches(i)]
        skipped = chosen.measurements.skipped_rows(watched)  # this process's rows, read before any sync
        report = SpectralReport()
        chosen.measurements.compute(report, ComputeContext(self._table, watched, self._reducer, metrics, spectra_dtype))
        warn_skipped(chosen, self._table.sites, skipped, " on this process" if is_distributed() else "")
        if extra_metrics:
            pairs = [report.eigenvalues.get(row["site"]) for row in report.rows]
            extras = spectra_module.extra_values(pairs, [row["tokens"] for row in report.rows])
            for row, values in zip(report.rows, extras):
                row.update(values)
        return report

    def __repr__(self) -> str:
        return (
            f"FFNTracker({type(self.root).__name__}, sites={len(self._table.sites)}, windows={list(self._windows)}, "
            f"max_tokens={self.max_tokens}, active={self.active})"
        )


def _instance(extra: Measurement | Callable[[], Measurement], window_index: int) -> Measurement:
    """A measurement for one window from an instance (the first window's; copies for the others) or a
    factory (a class, or any callable returning one)."""
    if isinstance(extra, Measurement):
        return extra if window_index == 0 else copy.deepcopy(extra)
    return extra()


def _warn_unmeasured_towers(root: nn.Module, sites) -> None:
    """Say which towers with FFNs (a vision or audio tower beside the text stack) no site measures: the
    adapter (or structural detection) names none of their blocks, so their rows are absent, not zero."""
    measured = [site.pre_path for site in sites]
    left_out = [c for c in model_adapters.other_towers(root) if not any(p.startswith(c + ".") for p in measured)]
    if left_out:
        warnings.warn(
            f"FFNTracker: the FFNs of {', '.join(left_out)} ({type(root).__name__}'s other towers) are not measured: "
            f"the adapter names only its text stack here (a tower's token source needs a table entry: "
            f"model_adapters/multimodal.py shows how)",
            RuntimeWarning,
            stacklevel=3,
        )
