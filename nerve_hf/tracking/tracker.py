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
:mod:`nerve_hf.tracking.call_inputs`, windows in :mod:`nerve_hf.tracking.windows`, spectra in :mod:`nerve_hf.spectra`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

import model_adapters
from model_adapters import Adapter, ResolvedSite
from nerve_hf import spectra
from nerve_hf import spectra as spectra_module  # for compute(), whose argument `spectra` hides the module name
from nerve_hf.metrics import padded_js
from nerve_hf.options import boolean, optional, positive_number, token_cap
from nerve_hf.parallel.comm import is_distributed, rank, world_size
from nerve_hf.parallel.sharded_spectra import assign_owners, gather_rows, sharded_metric_values
from nerve_hf.parallel.tensor_parallel import (
    NO_REDUCTION,
    data_parallel_group,
    full_width,
    modules_under_fsdp,
    sharded_width,
)
from nerve_hf.report import SpectralReport
from nerve_hf.stats.covariance import CovarianceAccumulator, common_device, sync_accumulators
from nerve_hf.stats.cross_covariance import linear_cka, sync_cross_accumulators
from nerve_hf.tracking.budget import MemoryBudgetError, covariance_state_bytes, format_mib
from nerve_hf.tracking.call_inputs import (
    batch_size,
    check_no_replicating_data_parallel,
    eager,
    first_tensor,
    in_backward,
    mask_position,
)
from nerve_hf.tracking.measurements.cross_layer import CROSS_LAYER_CHOICES, layer_pairs
from nerve_hf.tracking.measurements.flow import flow_values
from nerve_hf.tracking.measurements.positions import bucket_labels, check_buckets
from nerve_hf.tracking.windows import SiteWindow, Window

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
        flow: also the d-wide FFN input (the up/gate projection's input) and output (the down projection's
            output): rows gain :data:`~nerve_hf.tracking.measurements.flow.FLOW_KEYS` (SE/PR/EEE per stage, JS
            input -> pre and post -> output over zero-padded spectra) and the report ``flow_eigenvalues``.
        position_buckets: strictly increasing token positions ``[0, 16, 64, ...]``: one (pre, post) pair
            of accumulators per bucket [e_i, e_{i+1}) (the last is open) beside the overall pair, reported in
            ``report.positions``. A token's position is the number of real (``attention_mask``) tokens before
            it in its sequence, so left padding does not shift it; without a mask, its index in the sequence.
        cross_layer: ``"adjacent"`` (consecutive tracked layers of a family) or ``"all"`` (every pair):
            ``report.cross_layer`` rows with JS between the two layers' pre spectra and post spectra and
            the linear CKA of their FFN inputs, from a streaming cross-covariance per pair; ``None``: off.

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
        flow: bool = False,
        position_buckets: Sequence[int] | None = None,
        cross_layer: str | None = None,
    ) -> None:
        max_tokens = optional(token_cap)("max_tokens", max_tokens)  # the checks NerveConfig's fields use
        flow = boolean("flow", flow)
        self.position_buckets = check_buckets(position_buckets)
        if cross_layer is not None and cross_layer not in CROSS_LAYER_CHOICES:
            raise ValueError(f"cross_layer must be one of {CROSS_LAYER_CHOICES} or None, got {cross_layer!r}")
        self.flow, self.cross_layer = flow, cross_layer
        # Extra d-wide stages recorded per FFN: input and output for flow; input alone feeds the CKA.
        self._stages = ("input", "output") if flow else ("input",) if cross_layer is not None else ()
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
        self._stage_dims = [self._io_dims(site) for site in self._sites]  # stage -> d, or None
        self._layer_pairs = layer_pairs(self._sites, cross_layer)
        self._owners: list[int] | None = None  # site_sharded: the process that measures each site
        if site_sharded and self.group != NO_REDUCTION and is_distributed(self.group):
            if self._layer_pairs:
                raise ValueError(
                    "site_sharded does not support cross_layer: the two layers of a pair may be measured by "
                    "different processes"
                )
            self._owners = assign_owners([d or 1 for d in self._dims], world_size(self.group), power=2)
        buckets = len(self.position_buckets) if self.position_buckets is not None else 0
        for window in windows:
            window.bind(
                self._sites, self._dims, state_device, self._stages, self._stage_dims, buckets, self._layer_pairs
            )
        self._check_budget()
        self._mask_position = mask_position(self.root)
        self._handles: list = []
        self._depth = 0  # nesting of top-level forwards currently running
        self._mask: Tensor | None = None  # [B, T] bool of the running top-level forward
        self._rows: dict[torch.device, Tensor] = {}  # device -> flat indices of the mask's True rows
        self._positions: dict[tuple, Tensor | None] = {}  # (device, shape) -> positions of the selected rows
        self._inputs: dict[int, Tensor] = {}  # cross_layer: site -> its input rows in the running forward
        self._partners = {i: [b for a, b in self._layer_pairs if a == i] for i in range(len(self._sites))}
        self._edge_tensors: dict[torch.device, Tensor] = {}  # position_buckets' edges per device
        self._warned: set[str] = set()
        self._recorded = False  # did any site record during the running top-level forward?
        self._compiled = any("_orig_mod" in module._modules for module in model.modules())
        # Hook callables are made once: a compiled graph that baked them in keeps calling the same
        # functions, which record only while attached.
        self._begin_hook = eager(self._forward_begins)
        self._end_hook = eager(self._forward_ends)
        self._site_hooks = [(eager(self._pre_hook(i)), eager(self._post_hook(i))) for i in range(len(self._sites))]
        self._stage_hooks = [(eager(self._input_hook(i)), eager(self._output_hook(i))) for i in range(len(self._sites))]

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

    def _io_dims(self, site: ResolvedSite) -> dict:
        """Widths of the extra stages this tracker records: input = the pre module's input width,
        output = the post module's output width (None where unreadable: known at the first activation)."""
        pre_dims, post_dims = model_adapters.linear_dims(site.pre), model_adapters.linear_dims(site.post)
        widths = {"input": pre_dims[0] if pre_dims else None, "output": post_dims[1] if post_dims else None}
        return {stage: widths[stage] for stage in self._stages}

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
        if self._stages or self.position_buckets is not None:
            self._check_extended_budget()
            return
        if needed > self.memory_budget_mb * 2**20:
            widths = sorted(set(dims))
            raise MemoryBudgetError(
                f"FFNTracker: tracking {len(dims)} FFNs of width {widths[0] if len(widths) == 1 else widths} needs "
                f"{format_mib(needed)} MiB of float64 covariance state (2 x (D^2 + D) x 8 bytes per FFN), over "
                f"memory_budget_mb={self.memory_budget_mb:,g}. Track fewer FFNs (layers=[...]; NerveCallback's "
                f"layers_per_step measures a few per step) or raise the budget."
            )

    def _state_bytes(self, indices: list[int]) -> int:
        """float64 state of sites ``indices`` (widths known so far) with flow, buckets and layer pairs."""
        buckets = len(self.position_buckets) if self.position_buckets is not None else 0
        total = 0
        for i in indices:
            if self._dims[i] is not None:
                total += (1 + buckets) * covariance_state_bytes([self._dims[i]])
            total += sum((d * d + d) * 8 for d in self._stage_dims[i].values() if d is not None)
        chosen = set(indices)
        for a, b in self._layer_pairs:
            da, db = self._stage_dims[a].get("input"), self._stage_dims[b].get("input")
            if a in chosen and b in chosen and da is not None and db is not None:
                total += (da * db + da + db) * 8
        return total

    def _check_extended_budget(self) -> None:
        groups = [group for window in self._windows.values() for group in window.groups]
        needed = max(self._state_bytes([i for i in group if self._owns(i)]) for group in groups)
        if needed > self.memory_budget_mb * 2**20:
            raise MemoryBudgetError(
                f"FFNTracker: tracking {len(self._sites)} FFNs needs {format_mib(needed)} MiB of float64 state "
                f"([(1 + B) x 2 x (D^2 + D) + s x (d^2 + d)] x 8 bytes per FFN with "
                f"B={len(self.position_buckets or ())} position buckets and s={len(self._stages)} flow stages, "
                f"plus (d^2 + 2d) x 8 per layer pair), over "
                f"memory_budget_mb={self.memory_budget_mb:,g}. Track fewer FFNs or buckets, or raise the budget."
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
            for site, (input_hook, output_hook) in zip(self._sites, self._stage_hooks):
                if "input" in self._stages:
                    self._handles.append(site.pre.register_forward_pre_hook(input_hook, with_kwargs=True))
                if "output" in self._stages:
                    self._handles.append(site.post.register_forward_hook(output_hook))
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
        self._positions, self._inputs = {}, {}

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
            self._positions, self._inputs = {}, {}
            if self._window is not None:
                self._window.begin_forward()
                if self._window.keep_samples is not None:
                    self._limit_samples(args, kwargs)

    def _forward_ends(self, module: nn.Module, args: tuple, output) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            recorded_by, self._window = self._window, None
            self._mask, self._rows, self._keep = None, {}, None
            self._positions, self._inputs = {}, {}
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

    def _input_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args and isinstance(args[0], Tensor) else first_tensor(kwargs)
            self._record(index, "input", x)

        return hook

    def _output_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            self._record(index, "output", first_tensor(output))

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

    def _select(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The rows of ``x`` ([..., D]) that are real tokens: ([N, D], None), or on devices where
        reading the mask would wait for the device, all rows ([B*T, D]) and the mask ([B*T] bool)."""
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
            return flat, None
        # [B, T, D], or [B*T, D] for models that flatten tokens before the FFN (OPT)
        if tuple(x.shape[:-1]) not in (tuple(self._mask.shape), (self._mask.numel(),)):
            self._warn_once(
                "mask-shape",
                f"FFNTracker: attention_mask {tuple(self._mask.shape)} does not match activations "
                f"{tuple(x.shape)}; counting all their rows",
            )
            return flat, None
        rows = self._rows.get(x.device)
        if x.device.type not in CovarianceAccumulator.HOST_SYNC_DEVICE_TYPES:  # no nonzero(): it waits
            if rows is None:
                rows = self._rows[x.device] = self._mask.reshape(-1).to(x.device)  # [B*T] bool
            return flat, rows
        if rows is None:
            rows = self._rows[x.device] = self._mask.reshape(-1).nonzero().squeeze(1).to(x.device)  # [N]
        return flat.index_select(0, rows), None  # [N, D]

    def _cap_tokens(self, state, side: str, rows: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Apply ``max_tokens`` to this forward's rows (``[N, D]``, with ``keep`` ``[N]`` bool or None)."""
        if rows.device.type in CovarianceAccumulator.HOST_SYNC_DEVICE_TYPES:
            room = max(self.max_tokens - state.offered[side], 0)
            state.offered[side] += rows.shape[0]
            return rows[:room], None
        # On the device: the rows offered so far stay a device count, and the cap becomes part of the mask.
        if rows.shape[0] == 0:
            return rows, keep
        if keep is None:
            keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        offered = state.offered[side] + keep.cumsum(0)  # [N]: rows offered up to and including each
        state.offered[side] = offered[-1]
        return rows, keep & (offered <= self.max_tokens)

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
            x = full_width(x.detach(), self._layouts[index].get(side))  # tensor-parallel slices gathered
            site = self._sites[index]
            if side == "pre" and site.pre_chunk is not None:
                part, chunks = site.pre_chunk
                x = x.chunk(chunks, dim=-1)[part]  # Phi-3: the gate half of gate_up_proj
            rows, keep = self._select(x)  # [N, D], [N] bool or None (input/output: d wide)
            state = window.states[index]
            if side in ("pre", "post") and state.dim is None:  # widths that could not be read at construction
                self._width_seen(index, rows.shape[-1])
            elif side not in ("pre", "post") and state.accumulator(side) is None:
                self._stage_width_seen(index, side, rows.shape[-1])
            if self.max_tokens is not None:
                rows, keep = self._cap_tokens(state, side, rows, keep)
            state.accumulator(side).update(rows, keep)
            if state.buckets and side in ("pre", "post"):
                self._update_buckets(state, side, x, rows, keep)
            if side == "input" and self._layer_pairs:
                self._update_cross(window, index, rows, keep)
            self._recorded = True

    def _select_positions(self, x: Tensor) -> Tensor | None:
        """The position of each row :meth:`_select` returns for ``x``: ``[N]`` int64, or None when the
        activations do not show their sequence axis (flat rows without an attention mask).

        With a mask, a token's position is the number of real tokens before it in its sequence
        (``attention_mask.cumsum(-1) - 1``); without one, its index along the sequence axis (dim -2)."""
        key = (x.device, tuple(x.shape))
        if key in self._positions:
            return self._positions[key]
        positions = None
        lead = tuple(x.shape[:-1])
        if self._mask is not None and lead in (tuple(self._mask.shape), (self._mask.numel(),)):
            counted = (self._mask.long().cumsum(-1) - 1).reshape(-1).to(x.device)  # [B*T]
            if x.device.type in CovarianceAccumulator.HOST_SYNC_DEVICE_TYPES:  # _select kept the real rows
                counted = counted[self._mask.reshape(-1).to(x.device)]  # [N]
            positions = counted
        elif x.ndim >= 3:
            if self._mask is None and self._keep is not None:
                lead = (min(self._keep, lead[0]), *lead[1:])
            positions = torch.arange(lead[-1], device=x.device).expand(lead).reshape(-1)  # [N]
        else:
            self._warn_once(
                "positions",
                f"FFNTracker: activations {tuple(x.shape)} without an attention_mask show no sequence axis; "
                f"their rows are left out of the position buckets",
            )
        self._positions[key] = positions
        return positions

    def _update_buckets(self, state: SiteWindow, side: str, x: Tensor, rows: Tensor, keep: Tensor | None) -> None:
        """Add the rows just recorded for ``side`` (``rows``, with ``keep`` as the accumulator got them)
        to the accumulators of their position buckets."""
        positions = self._select_positions(x)
        if positions is None:
            return
        edges = self._edge_tensors.get(positions.device)
        if edges is None:
            edges = self._edge_tensors[positions.device] = torch.tensor(
                self.position_buckets, dtype=torch.long, device=positions.device
            )
        bucket = torch.bucketize(positions[: rows.shape[0]], edges, right=True) - 1  # [N]: -1 before the first edge
        for b, pair in enumerate(state.buckets):
            accumulator = pair[0 if side == "pre" else 1]
            if keep is not None:  # device path: masks, no host sync
                accumulator.update(rows, keep & (bucket == b))
            else:
                chosen = (bucket == b).nonzero().squeeze(1)
                if chosen.numel():
                    accumulator.update(rows.index_select(0, chosen))

    def _update_cross(self, window: Window, index: int, rows: Tensor, keep: Tensor | None) -> None:
        """cross_layer: pair this site's input rows with those of its earlier partners in this forward
        (rows of one forward are the same tokens in every layer)."""
        if keep is not None:
            rows = rows[keep]  # [N, d]; a host sync, paid only with cross_layer
        for pair in [(a, b) for a, b in self._layer_pairs if b == index and a in self._inputs]:
            earlier = self._inputs[pair[0]]
            if earlier.shape[0] != rows.shape[0]:
                self._warn_once(
                    "cross-rows",
                    f"FFNTracker: the FFN inputs of {self._sites[pair[0]].site} and {self._sites[index].site} "
                    f"hold different rows ({earlier.shape[0]} and {rows.shape[0]}); that pair is not updated",
                )
                continue
            window.cross_for(pair, earlier.shape[1], rows.shape[1]).update(earlier, rows)
            if max(self._partners[pair[0]], key=lambda j: self._sites[j].layer) == index:
                del self._inputs[pair[0]]  # no later partner: its rows are not needed again
        if self._partners[index]:
            self._inputs[index] = rows.clone()  # a copy: the model may later change its activations in place

    def _stage_width_seen(self, index: int, stage: str, width: int) -> None:
        """An input/output width known only from its first activation: budget, then accumulators."""
        self._stage_dims[index][stage] = width
        self._check_budget()
        for window in self._windows.values():
            if window.states[index].accumulator(stage) is None:
                window.states[index].allocate_stage(stage, width)

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
        spectra: str = "exact",
    ) -> SpectralReport:
        """Metrics of every site the window watches, over what it recorded so far, synced across processes.

        Collective under ``torch.distributed``: every rank must call it. The window keeps its
        statistics; call :meth:`reset` to start a new measurement.

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
        report = self._compute(spectra_module.metric_set(metrics, spectra), window, spectra_dtype)
        if extra_metrics:
            pairs = [report.eigenvalues.get(row["site"]) for row in report.rows]
            extras = spectra_module.extra_values(pairs, [row["tokens"] for row in report.rows])
            for row, values in zip(report.rows, extras):
                row.update(values)
        return report

    def _compute(self, metrics: str, window: str | None, spectra_dtype: str) -> SpectralReport:
        if metrics not in spectra.METRIC_SETS:
            raise ValueError(f"metrics must be one of {spectra.METRIC_SETS}, got {metrics!r}")
        chosen = self.window(window)
        watched = [i for i in range(len(self._sites)) if chosen.watches(i)]
        pairs = self._pairs([chosen.states[i] for i in watched])
        values, kept, counts = self._measure_pairs(pairs, metrics, spectra_dtype, watched)
        report = self._report(watched, counts, values, kept)
        if self.flow:
            self._add_flow(report, chosen, watched, metrics, spectra_dtype)
        if self.position_buckets is not None:
            self._add_positions(report, chosen, watched, metrics, spectra_dtype)
        if self._layer_pairs:
            self._add_cross_layer(report, chosen, watched)
        return report

    def _measure_pairs(self, pairs, metrics: str, spectra_dtype: str, sites: list[int]) -> tuple[list, list, list]:
        """(values, spectra, counts) of accumulator pairs, pair k being one of FFN ``sites[k]``'s: summed over
        the group, each process decomposing its share; site-sharded, measured by the FFN's owner on its own
        tokens, every row gathered to every process."""
        if self._owners is not None:
            me, world = rank(self.group), world_size(self.group)
            shares = [[k for k, i in enumerate(sites) if self._owners[i] == r] for r in range(world)]
            own = [pairs[k] for k in shares[me]]
            values, kept = spectra.metric_values(own, metrics, spectra_dtype)
            device = common_device([acc for pair in own for acc in pair])  # none measured here: the backend's
            dims = [first.dim for first, _ in pairs]  # the same on every process: widths known at construction
            counts = [first.count for first, _ in own]
            return gather_rows(values, kept, counts, shares, dims, metrics, device, self.group)
        if self.group != NO_REDUCTION and is_distributed(self.group):  # exact, each process decomposing its share
            return sharded_metric_values(pairs, metrics, self.group, spectra_dtype)
        values, kept = spectra.metric_values(pairs, metrics, spectra_dtype)
        return values, kept, [first.count for first, _ in pairs]

    def _add_flow(self, report: SpectralReport, window: Window, watched: list[int], metrics, spectra_dtype) -> None:
        """flow: the input and output spectra of every row, and JS between consecutive stages."""
        pairs = []
        for i in watched:
            state = window.states[i]
            if state.input is None or state.output is None or state.input.dim != state.output.dim:
                pairs.append((CovarianceAccumulator(1), CovarianceAccumulator(1)))  # unknown widths: NaN
            else:
                pairs.append((state.input, state.output))
        values, kept, _ = self._measure_pairs(pairs, metrics, spectra_dtype, watched)
        for row, i, row_values, io_spectra in zip(report.rows, watched, values, kept):
            if window.states[i].input is None:
                io_spectra = None
            row.update(
                flow_values(
                    self._stage_dims[i].get("input") or 0, row_values, io_spectra, report.eigenvalues.get(row["site"])
                )
            )
            if io_spectra is not None:
                report.flow_eigenvalues[row["site"]] = io_spectra

    def _add_positions(self, report: SpectralReport, window: Window, watched: list[int], metrics, spectra_dtype):
        """position_buckets: one row of metrics per site and bucket in ``report.positions``."""
        labels = bucket_labels(self.position_buckets)
        standin = (CovarianceAccumulator(1), CovarianceAccumulator(1))
        keys = [(i, b) for i in watched for b in range(len(labels))]
        pairs = [window.states[i].buckets[b] if window.states[i].buckets else standin for i, b in keys]
        values, kept, counts = self._measure_pairs(pairs, metrics, spectra_dtype, [i for i, _ in keys])
        for (i, b), row_values, count, bucket_spectra in zip(keys, values, counts, kept):
            label, start, end = labels[b]
            site = self._sites[i]
            if bucket_spectra is not None and window.states[i].buckets:
                report.position_eigenvalues[(site.site, label)] = bucket_spectra
            report.positions.append(
                {
                    "site": site.site,
                    "layer": site.layer,
                    "bucket": label,
                    "position_start": start,
                    "position_end": end,
                    "dim": int(self._dims[i] or 0),
                    "tokens": int(count),
                    **row_values,
                }
            )

    def _add_cross_layer(self, report: SpectralReport, window: Window, watched: list[int]) -> None:
        """cross_layer: JS between the two layers' spectra and linear CKA of their FFN inputs, per pair."""
        kept = set(watched)
        chosen = [(a, b) for a, b in self._layer_pairs if a in kept and b in kept]
        measured = []
        for a, b in chosen:
            inputs = window.states[a].input, window.states[b].input
            if inputs[0] is None or inputs[1] is None:
                measured.append(None)  # widths not known yet: nothing recorded
            else:
                measured.append(window.cross_for((a, b), inputs[0].dim, inputs[1].dim))
        if self.group != NO_REDUCTION and is_distributed(self.group):
            sync_cross_accumulators([cross for cross in measured if cross is not None], self.group)
            involved = sorted({i for (a, b), cross in zip(chosen, measured) if cross is not None for i in (a, b)})
            sync_accumulators([window.states[i].input for i in involved], self.group)
        for (a, b), cross in zip(chosen, measured):
            site_a, site_b = self._sites[a], self._sites[b]
            cka, tokens = math.nan, 0
            if cross is not None:
                tokens = cross.count
                x, y = window.states[a].input, window.states[b].input
                if tokens >= 2 and x.count == tokens and y.count == tokens:  # the same tokens in all three
                    cka = linear_cka(cross.cross_covariance(), x.covariance(), y.covariance())
            eig_a, eig_b = report.eigenvalues.get(site_a.site), report.eigenvalues.get(site_b.site)
            report.cross_layer.append(
                {
                    "site_a": site_a.site,
                    "site_b": site_b.site,
                    "layer_a": site_a.layer,
                    "layer_b": site_b.layer,
                    "tokens": int(tokens),
                    "js_pre": padded_js(eig_a[0], eig_b[0]) if eig_a and eig_b else math.nan,
                    "js_post": padded_js(eig_a[1], eig_b[1]) if eig_a and eig_b else math.nan,
                    "cka": cka,
                }
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
