"""FFNTracker: hook the pre- and post-activations of every FFN into streaming covariance accumulators.

Token accounting, the part that is easy to get wrong:

* Only rows of a *top-level* forward of the model are counted. Pre/post hook pairs on the model passed
  in and on its unwrapped root mark when such a forward is running; FFN hooks firing outside it (the
  forward that gradient checkpointing re-runs during backward) are ignored, so every token counts once.
* The ``attention_mask`` the model was called with selects the real tokens once per top-level forward;
  that same selection is applied to pre and post of every site whose activation is ``[B, T, d_ff]``
  (or ``[B*T, d_ff]``, row-major, as OPT flattens tokens before its FFN).
* ``max_tokens`` takes, per site and side, the first rows until the cap: pre and post see the same
  activations in the same order, so they keep the same tokens.

The module is longer than most here for one reason: the hooks and the token accounting share the
state of the running top-level forward (its depth, mask, recording window and sample limit), and
keeping them in one class keeps that state in one place. Pure helpers live in
:mod:`nerve_hf.hook_inputs`, windows in :mod:`nerve_hf.windows`, spectra in :mod:`nerve_hf.spectra`.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

import model_adapters
from model_adapters import Adapter, ResolvedSite

from . import spectra
from .budget import MemoryBudgetError, covariance_state_bytes, format_mib
from .covariance import CovarianceAccumulator, common_device
from .distributed import is_distributed, rank, world_size
from .hook_inputs import batch_size, check_no_replicating_data_parallel, eager, first_tensor, in_backward, mask_position
from .options import optional, positive_number, token_cap
from .sharded_spectra import assign_owners, gather_rows, sharded_metric_values
from .spectral_report import SpectralReport
from .tensor_parallel import NO_REDUCTION, data_parallel_group, full_width, modules_under_fsdp, sharded_width
from .windows import SiteWindow, Window

__all__ = ["FFNTracker", "MemoryBudgetError", "Window", "covariance_state_bytes"]


class FFNTracker:
    """Covariance eigenspectra of FFN pre/post-activations over a measurement window.

    Args:
        model: any model the adapters understand, possibly wrapped (DDP, ``torch.compile``, FSDP,
            checkpoint wrappers): sites are resolved on the unwrapped model. ``nn.DataParallel`` over
            several devices raises ValueError (use DDP).
        adapter: where the FFNs are; ``None`` asks :func:`model_adapters.get_adapter`.
        layers: block indices to track (negative counts from the end); ``None`` tracks all.
        max_tokens: per site, count at most this many tokens per window (first come); ``None``: all.
        when, keep_samples, staged: the one window's options (see :class:`nerve_hf.windows.Window`):
            ``when`` picks the top-level forwards that count (e.g. ``lambda m: not m.training``),
            ``keep_samples`` how many leading samples of each, ``staged`` keeps only the last forward
            until :meth:`commit`.
        windows: several named :class:`~nerve_hf.windows.Window` s instead (then leave ``when``,
            ``keep_samples``, ``staged`` unset); each forward is recorded by the first that accepts it,
            and :meth:`compute`, :meth:`reset`, :meth:`commit`, :meth:`rotate` take the window's name.
        group: the data-parallel process group whose statistics :meth:`compute` sums (default: every
            process). Its processes then share the eigendecompositions (:mod:`nerve_hf.sharded_spectra`).
        site_sharded: under several processes, each process owns about 1/W of the FFNs (balanced by D²,
            :func:`~nerve_hf.sharded_spectra.assign_owners`), keeps state only for them and measures them on
            its own tokens: a per-site token subsample, with each row's ``tokens`` saying how many. Nothing
            is reduced; the rows are gathered so every process reports every FFN.
        state_device: where the float64 state lives (``"cpu"``: host memory, for FFNs whose state does not
            fit beside the model); ``None``: the activations' device.
        memory_budget_mb: refuse (:class:`MemoryBudgetError`, a ``ValueError``) at construction, before
            anything is allocated, when the float64 covariance state of one window's watched FFNs
            (its largest round-robin group), 2 × (D² + D) × 8 bytes each, would exceed this many MiB;
            ``None``: no limit.
            :meth:`compute` needs, transiently, about 4 x min(that state, 1 GiB or one FFN's D² x 8).

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
    ) -> None:
        max_tokens = optional(token_cap)("max_tokens", max_tokens)  # the checks NerveConfig's fields use
        memory_budget_mb = optional(positive_number)("memory_budget_mb", memory_budget_mb)
        check_no_replicating_data_parallel(model)
        self.model = model
        self.root = model_adapters.unwrap_model(model)  # sites are resolved here
        self.adapter = adapter if adapter is not None else model_adapters.get_adapter(self.root)
        self.max_tokens = max_tokens
        self.memory_budget_mb = memory_budget_mb
        if windows is None:
            windows = [Window(when=when, keep_samples=keep_samples, staged=staged)]
        elif when is not None or keep_samples is not None or staged:
            raise TypeError("pass when/keep_samples/staged or windows, not both")
        if len({w.name for w in windows}) != len(windows) or not windows:
            raise ValueError(f"windows need distinct names, got {[w.name for w in windows]}")
        self._windows = {window.name: window for window in windows}
        self._window: Window | None = None  # the window recording the running top-level forward
        self._keep: int | None = None  # leading samples of the running forward that count; None: all
        self._sites = model_adapters.resolve_sites(self.root, self.adapter, layers)
        # Tensor-parallel FFNs: which side's activations arrive as column slices, and over which mesh.
        fsdp = modules_under_fsdp(self.root)
        self._layouts = [
            {
                side: sharded_width(getattr(site, side), side, id(getattr(site, side)) in fsdp)
                for side in ("pre", "post")
            }
            for site in self._sites
        ]
        sharded = [layout for pair in self._layouts for layout in pair.values() if layout is not None]
        self.group = data_parallel_group(sharded) if sharded and group is None else group
        self._dims = [self._site_dim(site) for site in self._sites]  # None: known at the first activation
        self._owners: list[int] | None = None  # site_sharded: the process that measures each site
        if site_sharded and self.group != NO_REDUCTION and is_distributed(self.group):
            self._owners = assign_owners([d or 1 for d in self._dims], world_size(self.group), power=2)
        for window in windows:
            window.bind(self._sites, self._dims, state_device)
        self._check_budget()
        self._mask_position = mask_position(self.root)
        self._handles: list = []
        self._depth = 0  # nesting of top-level forwards currently running
        self._mask: Tensor | None = None  # [B, T] bool of the running top-level forward
        self._rows: dict[torch.device, Tensor] = {}  # device -> flat indices of the mask's True rows
        self._warned: set[str] = set()
        self._recorded = False  # did any site record during the running top-level forward?
        self._compiled = any("_orig_mod" in module._modules for module in model.modules())
        # Hook callables are made once: a compiled graph that baked them in keeps calling the same
        # functions, which record only while attached.
        self._begin_hook = eager(self._forward_begins)
        self._end_hook = eager(self._forward_ends)
        self._site_hooks = [(eager(self._pre_hook(i)), eager(self._post_hook(i))) for i in range(len(self._sites))]

    # ------------------------------------------------------------------ sites
    @staticmethod
    def _site_dim(site: ResolvedSite) -> int | None:
        """d_ff from the module shapes; ValueError when pre and post disagree; None if unreadable."""
        pre_dims, post_dims = model_adapters.linear_dims(site.pre), model_adapters.linear_dims(site.post)
        if pre_dims is None or post_dims is None:
            return None
        pre_width = pre_dims[1]
        if site.pre_chunk is not None:
            index, chunks = site.pre_chunk
            if pre_width % chunks:
                raise ValueError(f"{site.site}: {site.pre_path} width {pre_width} is not divisible by {chunks}")
            pre_width //= chunks
        if pre_width != post_dims[0]:
            raise ValueError(
                f"{site.site}: pre ({site.pre_path}, width {pre_width}) and post ({site.post_path}, width "
                f"{post_dims[0]}) differ; the adapter does not describe one FFN (fused projection? set pre_chunk)"
            )
        return pre_width

    def _width_seen(self, index: int, width: int) -> None:
        """Site ``index``'s width is known only from its first activation: check the budget, then give
        every window accumulators of that width."""
        self._dims[index] = width
        self._check_budget()
        for window in self._windows.values():
            if window.states[index].dim is None:
                window.states[index].allocate(width)

    def _check_budget(self) -> None:
        """MemoryBudgetError if one window's largest group of FFNs needs more state than the budget."""
        if self.memory_budget_mb is None:
            return
        dims = max(
            (
                [self._dims[i] for i in group if self._dims[i] is not None and self._owns(i)]
                for window in self._windows.values()
                for group in window.groups
            ),
            key=covariance_state_bytes,
        )
        needed = covariance_state_bytes(dims)
        if needed > self.memory_budget_mb * 2**20:
            widths = sorted(set(dims))
            raise MemoryBudgetError(
                f"FFNTracker: tracking {len(dims)} FFNs of width {widths[0] if len(widths) == 1 else widths} needs "
                f"{format_mib(needed)} MiB of float64 covariance state (2 x (D^2 + D) x 8 bytes per FFN), over "
                f"memory_budget_mb={self.memory_budget_mb:,g}. Track fewer FFNs (layers=[...]; NerveCallback's "
                f"layers_per_step measures a few per step) or raise the budget."
            )

    def _owns(self, index: int) -> bool:
        """Whether this process measures site ``index`` (always, unless site-sharded)."""
        return self._owners is None or self._owners[index] == rank(self.group)

    @property
    def sites(self) -> list[ResolvedSite]:
        """The tracked sites, in report order."""
        return list(self._sites)

    def window(self, name: str | None = None) -> Window:
        """The window called ``name`` (``None``: the first)."""
        if name is None:
            return next(iter(self._windows.values()))
        if name not in self._windows:
            raise KeyError(f"no window {name!r}; this tracker has {sorted(self._windows)}")
        return self._windows[name]

    @property
    def _states(self) -> list[SiteWindow]:
        """The first window's per-site statistics."""
        return self.window().states

    @property
    def active(self) -> bool:
        """True while the hooks are attached."""
        return bool(self._handles)

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "FFNTracker":
        """Register the hooks (what ``__enter__`` does)."""
        if self._handles:
            raise RuntimeError("FFNTracker is already attached; exit the previous `with` block first")
        try:
            # The outermost module's hooks run eagerly even when the model inside is compiled; the
            # root's catch calls that bypass the wrappers. Nested calls just deepen the forward count.
            for module in dict.fromkeys((self.model, self.root)):  # distinct, in order
                self._handles.append(module.register_forward_pre_hook(self._begin_hook, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._end_hook, always_call=True))
            for site, (pre_hook, post_hook) in zip(self._sites, self._site_hooks):
                self._handles.append(site.pre.register_forward_hook(pre_hook))
                self._handles.append(site.post.register_forward_pre_hook(post_hook, with_kwargs=True))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook (what ``__exit__`` does); safe to call twice."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._depth, self._mask, self._rows, self._keep, self._window = 0, None, {}, None, None

    def __enter__(self) -> "FFNTracker":
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def _forward_begins(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth == 1:
            self._window = next((w for w in self._windows.values() if w.accepts(module)), None)
            self._mask = self._find_mask(args, kwargs) if self._window is not None else None
            self._rows, self._recorded, self._keep = {}, False, None
            if self._window is not None:
                self._window.begin_forward()
                if self._window.keep_samples is not None:
                    self._limit_samples(args, kwargs)

    def _forward_ends(self, module: nn.Module, args: tuple, output) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            recorded_by, self._window = self._window, None
            self._mask, self._rows, self._keep = None, {}, None
            if self._compiled and self._handles and recorded_by is not None and not self._recorded and self._sites:
                self._warn_once(
                    "compiled",
                    "FFNTracker: a forward of the compiled model ran without reaching any FFN hook. "
                    "torch.compile does not see hooks added after it traced the model "
                    "(torch._dynamo.config.skip_nnmodule_hook_guards): enter the tracker before the first "
                    "compiled call, or set torch._dynamo.config.skip_nnmodule_hook_guards = False.",
                )

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            self._record(index, "pre", first_tensor(output))

        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args and isinstance(args[0], Tensor) else first_tensor(kwargs)
            self._record(index, "post", x)

        return hook

    # --------------------------------------------------------------- tokens
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _find_mask(self, args: tuple, kwargs: dict) -> Tensor | None:
        """The ``attention_mask`` of this call as ``[B, T]`` bool, or None."""
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        if not isinstance(mask, Tensor):
            return None
        if mask.ndim != 2:
            self._warn_once(
                "mask-ndim",
                f"FFNTracker: attention_mask of shape {tuple(mask.shape)} is not [batch, seq]; counting all tokens",
            )
            return None
        return mask.detach() != 0  # [B, T]

    def _limit_samples(self, args: tuple, kwargs: dict) -> None:
        """Apply ``keep_samples`` to this forward: drop the samples after the first n from the mask."""
        batch = self._mask.shape[0] if self._mask is not None else batch_size(args, kwargs)
        if batch is None:
            return
        keep = self._window.keep_samples(batch)
        if keep is None or keep >= batch:
            return
        keep = max(int(keep), 0)
        if self._mask is not None:
            self._mask = self._mask.clone()
            self._mask[keep:] = False
        else:
            self._keep = keep

    def _select(self, x: Tensor) -> Tensor:
        """The rows of ``x`` ([..., D]) that are real tokens, flattened to [N, D]."""
        if self._mask is None and self._keep is not None:
            if x.ndim < 3:
                self._warn_once(
                    "keep-flat",
                    f"FFNTracker: cannot leave out repeated samples of activations {tuple(x.shape)} without an "
                    f"attention_mask; counting all their rows",
                )
            else:
                x = x[: self._keep]  # [keep, T, D]
        flat = x.reshape(-1, x.shape[-1])  # [B*T, D]
        if self._mask is None:
            return flat
        # [B, T, D], or [B*T, D] for models that flatten tokens before the FFN (OPT)
        if tuple(x.shape[:-1]) not in (tuple(self._mask.shape), (self._mask.numel(),)):
            self._warn_once(
                "mask-shape",
                f"FFNTracker: attention_mask {tuple(self._mask.shape)} does not match activations "
                f"{tuple(x.shape)}; counting all their rows",
            )
            return flat
        rows = self._rows.get(x.device)
        if rows is None:
            rows = self._rows[x.device] = self._mask.reshape(-1).nonzero().squeeze(1).to(x.device)  # [N]
        return flat.index_select(0, rows)  # [N, D]

    def _record(self, index: int, side: str, x: Tensor | None) -> None:
        window = self._window
        if x is None or not self._handles or (self._depth > 0 and (window is None or not window.watches(index))):
            return
        if not self._owns(index):  # site-sharded: another process measures this FFN
            return
        if self._depth == 0:
            if not in_backward():  # a recompute under gradient checkpointing is silently ignored
                self._warn_once(
                    "outside",
                    f"FFNTracker: an FFN ran outside a forward of {type(self.root).__name__}; not counted "
                    f"(call the model passed to FFNTracker, not one of its submodules)",
                )
            return
        with torch.no_grad(), torch.inference_mode(False), torch.autocast(x.device.type, enabled=False):
            x = full_width(x.detach(), self._layouts[index][side])  # tensor-parallel slices gathered
            site = self._sites[index]
            if side == "pre" and site.pre_chunk is not None:
                part, chunks = site.pre_chunk
                x = x.chunk(chunks, dim=-1)[part]  # Phi-3: the gate half of gate_up_proj
            rows = self._select(x)  # [N, D]
            state = window.states[index]
            if state.dim is None:  # modules whose widths could not be read at construction
                self._width_seen(index, rows.shape[-1])
            if self.max_tokens is not None:
                room = max(self.max_tokens - state.offered[side], 0)
                state.offered[side] += rows.shape[0]
                rows = rows[:room]
            state.accumulator(side).update(rows)
            self._recorded = True

    # ---------------------------------------------------------------- results
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
    ) -> SpectralReport:
        """Metrics of every site the window watches, over what it recorded so far, synced across processes.

        Collective under ``torch.distributed``: every rank must call it. The window keeps its
        statistics; call :meth:`reset` to start a new measurement.

        Args:
            metrics: ``"all"``: eigendecompose every covariance, all seven metrics and the eigenvalues.
                ``"pr"``: only ``pr_pre`` and ``pr_post``, from the identity PR = tr(Σ)² / ‖Σ‖²_F with no
                eigendecomposition (O(D²) instead of O(D³)); the other metrics are NaN and the report
                carries no eigenvalues.
            window: which window (default: the first).
            extra_metrics: also :data:`nerve_hf.summaries.EXTRA_METRIC_NAMES` in every row (effective and
                stable rank, α-ReQ exponent, finite-sample-corrected PR), from the same eigenvalues.
            spectra_dtype: ``"float64"`` (default) or ``"float32"`` eigendecompositions; float32 is faster
                on CPUs, and its error on real activation spectra is measured in
                ``benchmarks/results/perf/spectra_precision_cpu.json``.
        """
        report = self._compute(metrics, window, spectra_dtype)
        if extra_metrics:
            pairs = [report.eigenvalues.get(row["site"]) for row in report.rows]
            for row, values in zip(report.rows, spectra.extra_values(pairs, [row["tokens"] for row in report.rows])):
                row.update(values)
        return report

    def _compute(self, metrics: str, window: str | None, spectra_dtype: str) -> SpectralReport:
        if metrics not in spectra.METRIC_SETS:
            raise ValueError(f"metrics must be one of {spectra.METRIC_SETS}, got {metrics!r}")
        chosen = self.window(window)
        watched = [i for i in range(len(self._sites)) if chosen.watches(i)]
        if self._owners is not None:
            return self._site_sharded_report(chosen, watched, metrics, spectra_dtype)
        pairs = self._pairs([chosen.states[i] for i in watched])
        if self.group != NO_REDUCTION and is_distributed(self.group):  # exact, each process decomposing its share
            values, kept, counts = sharded_metric_values(pairs, metrics, self.group, spectra_dtype)
        else:
            values, kept = spectra.metric_values(pairs, metrics, spectra_dtype)
            counts = [pre.count for pre, _ in pairs]
        return self._report(watched, counts, values, kept)

    def _site_sharded_report(
        self, window: Window, watched: list[int], metrics: str, spectra_dtype: str
    ) -> SpectralReport:
        """Each process's own FFNs on its own tokens, every row gathered to every process."""
        me, world = rank(self.group), world_size(self.group)
        shares = [[i for i in watched if self._owners[i] == r] for r in range(world)]
        pairs = self._pairs([window.states[i] for i in shares[me]])
        values, kept = spectra.metric_values(pairs, metrics, spectra_dtype)
        device = common_device([acc for pair in pairs for acc in pair])  # none measured here: the backend's
        dims = [d or 1 for d in self._dims]
        values, kept, counts = gather_rows(
            values, kept, [pre.count for pre, _ in pairs], shares, dims, metrics, device, self.group
        )
        return self._report(
            watched, [counts[i] for i in watched], [values[i] for i in watched], [kept[i] for i in watched]
        )

    @staticmethod
    def _pairs(states: list[SiteWindow]) -> list[tuple[CovarianceAccumulator, CovarianceAccumulator]]:
        """(pre, post) of each site. A site whose width is still unknown (modules not Linear-like, no
        activation seen yet) gets empty width-1 stand-ins: NaN metrics and 0 tokens, nothing stored."""
        return [
            (state.pre, state.post) if state.dim is not None else (CovarianceAccumulator(1), CovarianceAccumulator(1))
            for state in states
        ]

    def _report(self, indices: list[int], counts: list, values: list[dict], kept: list) -> SpectralReport:
        """The report of sites ``indices`` from their token counts, metric values and spectra."""
        rows = [
            {
                "site": self._sites[i].site,
                "layer": self._sites[i].layer,
                "dim": int(self._dims[i] or 0),
                "tokens": int(count),
                **row_values,
            }
            for i, count, row_values in zip(indices, counts, values)
        ]
        eigenvalues = {self._sites[i].site: pair for i, pair in zip(indices, kept) if pair is not None}
        return SpectralReport(rows=rows, eigenvalues=eigenvalues)

    def __repr__(self) -> str:
        return (
            f"FFNTracker({type(self.root).__name__}, sites={len(self._sites)}, windows={list(self._windows)}, "
            f"max_tokens={self.max_tokens}, active={self.active})"
        )
