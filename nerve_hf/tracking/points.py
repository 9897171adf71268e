"""Hook points: a named point per FFN site and stage, apart from the measurements that consume them.

Stages, in the order a forward reaches them: ``input`` (the up/gate projection's input), ``pre`` (its
output), ``post`` (the down projection's input) and ``output`` (its output). A site is hooked only at the
stages some measurement subscribed to.

Token accounting, the part that is easy to get wrong:

* Only rows of a *top-level* forward of the model are counted. Pre/post hook pairs on the model passed
  in and on its unwrapped root mark when such a forward is running; FFN hooks firing outside it (the
  forward that gradient checkpointing re-runs during backward, the encoder ``generate`` runs as a
  submodule) are ignored, so every token counts once.
* The site's token source (:mod:`nerve_hf.tracking.tokens`) decides which rows count: by default the
  ``attention_mask`` the model was called with selects the real tokens once per top-level forward, and
  that same selection applies to every stage of every site whose activation is ``[B, T, D]`` (or
  ``[B*T, D]``, row-major, as OPT flattens tokens before its FFN).
* ``max_tokens`` (the recording window's :class:`~nerve_hf.tracking.tokens.TokenCap`) takes, per site and
  stage, the first rows until the cap: pre and post see the same activations in the same order, so they
  keep the same tokens.

Each firing hands the recording window's measurements ``(site, stage, rows [N, W], keep [N] bool or None,
positions)``, with ``positions()`` computed only when a measurement asks.

Routed experts (sites of kind ``"expert"``) have one stage, ``experts``: a forward pre-hook (with kwargs)
on the fused experts module reads its call ``(hidden_states [N, D], top_k_index [N, k], top_k_weights
[N, k])``; the site's token source says which of the N rows are real tokens (the rows are the block's
``[B, T, D]`` input flattened, so ``[B*T]`` maps onto the mask), and
:mod:`nerve_hf.tracking.experts_compute` recomputes each expert's pre and post on the real assignments.
The measurements receive an :class:`~nerve_hf.tracking.experts_compute.ExpertRows` as ``rows``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

import model_adapters
from model_adapters import Adapter, ResolvedSite
from nerve_hf.errors import first_line
from nerve_hf.integrations.trainer_internals import in_generation
from nerve_hf.parallel.tensor_parallel import full_width, modules_under_fsdp, sharded_width
from nerve_hf.tracking.call_inputs import WarnOnce, eager, first_tensor, in_backward
from nerve_hf.tracking.experts_compute import ExpertsLayout, expert_rows, read_call
from nerve_hf.tracking.site_table import SiteTable
from nerve_hf.tracking.tokens import TokenSource
from nerve_hf.tracking.windows import Window

__all__ = ["STAGES", "resolve_sites", "site_dim", "FFNHookPoints"]

STAGES = ("input", "pre", "post", "output", "experts")


def _site_stages(site: ResolvedSite) -> tuple[str, ...]:
    """The stages a site has: ``experts`` for routed experts, the four others for every other FFN."""
    return ("experts",) if site.kind == "expert" else STAGES[:4]


def site_dim(site: ResolvedSite) -> Optional[int]:
    """d_ff from the module shapes (an expert's width for routed experts); ValueError when pre and post
    disagree; None if unreadable."""
    if site.kind == "expert":
        if getattr(site.pre, "_is_expert_parallel", False):
            raise ValueError(
                f"{site.site}: the experts of {site.pre_path} are sharded by expert parallelism (each process "
                f"holds some of them); measuring routed experts under expert parallelism is not supported: load "
                f"the model without it (no ep_size / enable_expert_parallel in its DistributedConfig; data "
                f"parallelism is measured exactly), or pass layers= without its MoE layers"
            )
        return ExpertsLayout.of(site.post, site.experts).sizes(site.post)[1]
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


def _io_dims(site: ResolvedSite) -> dict[str, Optional[int]]:
    """input = the pre module's input width, output = the post module's output width (None: unreadable)."""
    if site.kind == "expert":
        return {"input": None, "output": None}
    pre_dims, post_dims = model_adapters.linear_dims(site.pre), model_adapters.linear_dims(site.post)
    return {"input": pre_dims[0] if pre_dims else None, "output": post_dims[1] if post_dims else None}


def resolve_sites(root: nn.Module, adapter: Adapter, layers, state_device=None) -> tuple[SiteTable, list[dict]]:
    """The sites of the unwrapped model ``root`` with their widths, and per site the tensor-parallel
    layout of its pre and post activations (``{"pre": ShardedWidth or None, "post": ...}``)."""
    sites = model_adapters.resolve_sites(root, adapter, layers)
    fsdp = modules_under_fsdp(root)
    layouts = [
        {side: sharded_width(getattr(site, side), side, id(getattr(site, side)) in fsdp) for side in ("pre", "post")}
        for site in sites
    ]
    table = SiteTable(sites, [site_dim(site) for site in sites], [_io_dims(site) for site in sites], state_device)
    return table, layouts


class FFNHookPoints:
    """The hooks of a tracker: top-level forward begin/end on the model (and its unwrapped root), and per
    site the stages in ``stages``.

    Args:
        model, root: the model passed to the tracker and its unwrapped root (sites live there).
        table: the sites and their widths (widths first seen in an activation are written there).
        layouts: per site, its tensor-parallel layouts (see :func:`resolve_sites`).
        windows: the tracker's windows by name; each forward is recorded by the first that accepts it.
        stages: the stages to hook.
        owns: whether this process measures a site (site-sharded: only its own sites are hooked).
        tokens_for: the token source of a site.
        on_width: called after a width was first read from an activation (the memory budget's check).
    """

    def __init__(
        self,
        model: nn.Module,
        root: nn.Module,
        table: SiteTable,
        layouts: Sequence[dict],
        windows: dict[str, Window],
        stages: set[str],
        owns: Callable[[int], bool],
        tokens_for: Callable[[ResolvedSite], TokenSource],
        on_width: Callable[[], None],
    ) -> None:
        self.model, self.root, self.table, self.layouts = model, root, table, list(layouts)
        self.windows = windows
        self.sources = [tokens_for(site) for site in table.sites]
        self._distinct_sources = list({id(source): source for source in self.sources}.values())
        self._on_width = on_width
        self._warn = WarnOnce()
        self._handles: list = []
        self._depth = 0  # nesting of top-level forwards currently running
        self._window: Optional[Window] = None  # the window recording the running top-level forward
        self._recorded = False  # did any site record during the running top-level forward?
        self._compiled = any("_orig_mod" in module._modules for module in model.modules())
        # Hook callables are made once: a compiled graph that baked them in keeps calling the same
        # functions, which record only while attached.
        self._begin_hook, self._end_hook = eager(self._forward_begins), eager(self._forward_ends)
        owned = [i for i in range(len(table.sites)) if owns(i)]
        self._points = [
            (i, stage, eager(self._hook(i, stage)))
            for i in owned
            for stage in _site_stages(table.sites[i])
            if stage in stages
        ]
        self._routers: dict[int, object] = {}  # site -> its router's last output ("scaled" routing)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def in_forward(self) -> bool:
        """A top-level forward is running, or never ended: a KeyboardInterrupt skips torch's always-call hooks."""
        return self._depth > 0

    def _hook(self, index: int, stage: str):
        """The hook of site ``index``'s ``stage``: a forward hook reading the output (pre, output) or a
        forward pre-hook reading the first input (input, post)."""
        if stage == "experts":

            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                self.record_experts(index, module, args, kwargs)

        elif stage in ("pre", "output"):

            def hook(module: nn.Module, args: tuple, output) -> None:
                self._record_or_fail(index, stage, lambda: self.record(index, stage, first_tensor(output)))

        else:

            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args and isinstance(args[0], Tensor) else first_tensor(kwargs)  # a lookup only
                self._record_or_fail(index, stage, lambda: self.record(index, stage, x))

        return hook

    def attach(self) -> None:
        if self._handles:
            raise RuntimeError("FFNTracker is already attached; exit the previous `with` block first")
        try:
            # The outermost module's hooks run eagerly even when the model inside is compiled; the
            # root's catch calls that bypass the wrappers. Nested calls just deepen the forward count.
            for module in dict.fromkeys((self.model, self.root)):  # distinct, in order
                self._handles.append(module.register_forward_pre_hook(self._begin_hook, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._end_hook, always_call=True))
            for order in (("pre", "post", "experts"), ("input", "output")):  # pre/post of every site first
                for index, stage, hook in self._points:
                    if stage in order:
                        site = self.table.sites[index]
                        module = site.pre if stage in ("input", "pre", "experts") else site.post
                        if stage == "experts" and site.router is not None:
                            self._handles.append(site.router.register_forward_hook(self._router_hook(index)))
                        if stage in ("pre", "output"):
                            self._handles.append(module.register_forward_hook(hook))
                        else:
                            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._depth, self._window = 0, None
        self._routers.clear()
        for source in self._distinct_sources:
            source.end()
        for window in self.windows.values():
            if window.measurements is not None:
                window.measurements.end_forward()

    def _forward_begins(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth == 1:
            self._window = next((w for w in self.windows.values() if w.accepts(module)), None)
            self._recorded = False
            for source in self._distinct_sources:
                source.end()
            if self._window is not None:
                self._window.begin_forward()
                for source in self._distinct_sources:
                    source.begin(args, kwargs, self._window.keep_samples)

    def _forward_ends(self, module: nn.Module, args: tuple, output) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            recorded_by, self._window = self._window, None
            for source in self._distinct_sources:
                source.end()
            if recorded_by is not None:
                recorded_by.measurements.end_forward()
            if self._compiled and self._handles and recorded_by is not None and not self._recorded and self.table.sites:
                self._warn(
                    "compiled",
                    "FFNTracker: a forward of the compiled model ran without reaching any FFN hook. "
                    "torch.compile does not see hooks added after it traced the model "
                    "(torch._dynamo.config.skip_nnmodule_hook_guards): enter the tracker before the first "
                    "compiled call, or set torch._dynamo.config.skip_nnmodule_hook_guards = False.",
                )

    def _record_or_fail(self, index: int, stage: str, record: Callable[[], None]) -> None:
        """Run ``record`` (one firing of site ``index``'s ``stage``). A hook never raises into the model's
        forward: a failure (an allocation that fails, ...) marks the recording window as lost
        (:meth:`~nerve_hf.tracking.windows.Window.fail`) and warns once."""
        window = self._window
        if window is not None and window.failed is not None:
            return  # lost already: nothing more is recorded until its reset
        try:
            record()
        except Exception as error:  # noqa: BLE001
            reason = f"{self.table.sites[index].site} {stage}: {type(error).__name__}: {first_line(error)}"
            if window is not None:
                window.fail(reason)
            self._warn(f"hook:{type(error).__name__}", f"FFNTracker: recording failed ({reason}); this window is lost")

    def record(self, index: int, stage: str, x: Optional[Tensor]) -> None:
        """One firing: site ``index``'s ``stage`` produced ``x`` ([..., W])."""
        window = self._window
        if x is None or not self._handles or (self._depth > 0 and (window is None or not window.watches(index))):
            return
        if self._depth == 0:
            # silently ignored: a recompute under gradient checkpointing, the encoder generate runs
            if not in_backward() and not in_generation():
                self._warn(
                    "outside",
                    f"FFNTracker: an FFN ran outside a forward of {type(self.root).__name__}; not counted "
                    f"(call the model passed to FFNTracker, not one of its submodules)",
                )
            return
        with torch.no_grad(), torch.inference_mode(False), torch.autocast(x.device.type, enabled=False):
            x = self._prepare(index, stage, x)
            source = self.sources[index]
            rows, keep = source.select(x)  # [N, W], [N] bool or None
            if self.table.width(index, stage) is None:  # widths that could not be read at construction
                self.table.learn(index, stage, rows.shape[-1])
                self._on_width()
            rows, keep = window.cap.apply(index, stage, rows, keep)

            def positions(n: int = rows.shape[0]) -> Optional[Tensor]:
                at = source.positions(x)  # [M] for all rows of x that select returned
                return None if at is None else at[:n]

            window.measurements.update(index, stage, rows, keep, positions)
            self._recorded = True

    def _router_hook(self, index: int):
        """Keeps the router's output for the experts call that follows it ("scaled" routing)."""

        def hook(module: nn.Module, args: tuple, output) -> None:
            self._routers[index] = output

        return eager(hook)

    def _gate(self, index: int) -> Optional[Window]:
        """The window recording site ``index`` now, or None (not attached, not watched, or outside a
        top-level forward: warned once unless a gradient-checkpoint recompute)."""
        window = self._window
        if not self._handles or (self._depth > 0 and (window is None or not window.watches(index))):
            return None
        if self._depth == 0:
            if not in_backward() and not in_generation():
                self._warn(
                    "outside",
                    f"FFNTracker: an FFN ran outside a forward of {type(self.root).__name__}; not counted "
                    f"(call the model passed to FFNTracker, not one of its submodules)",
                )
            return None
        return window

    def record_experts(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """One call of site ``index``'s experts module: its real assignments, recomputed, to the measurements
        (a failure loses the window with one warning, as for every stage: :meth:`_record_or_fail`)."""
        router_output = self._routers.pop(index, None)  # this call's router output, measured or not
        self._record_or_fail(index, "experts", lambda: self._record_experts(index, args, kwargs, router_output))

    def _record_experts(self, index: int, args: tuple, kwargs: dict, router_output) -> None:
        window = self._gate(index)
        if window is None:
            return
        site = self.table.sites[index]
        # inference_mode(False) turns grad mode on: no_grad() inside it, so no graph reaches the parameters
        with torch.inference_mode(False), torch.no_grad():
            call = read_call(site.experts, args, kwargs, site.router, router_output)
            if call is None:
                self._warn("experts-call", f"FFNTracker: cannot read the routing of {site.pre_path}; not counted")
                return
            with torch.autocast(call.inputs.device.type, enabled=False):
                n = call.tokens
                source = self.sources[index]
                shape = source.token_shape(n) if hasattr(source, "token_shape") else (n,)  # [N] or [B, T]
                ids = torch.arange(n, device=call.top_k_index.device).view(*shape, 1)  # token row numbers
                ids, keep = source.select(ids)
                ids, keep = window.cap.apply(index, "experts", ids, keep)
                real = torch.zeros(n, dtype=torch.bool, device=ids.device)  # [N]
                real[ids[:, 0]] = True if keep is None else keep
                layout = ExpertsLayout.of(site.post, site.experts)  # post: the module holding the weights
                wanted = window.measurements.experts_wanted(index)
                rows = expert_rows(site.post, layout, call, real, wanted)
            window.measurements.update(index, "experts", rows, None, lambda: None)
            self._recorded = True

    def _prepare(self, index: int, stage: str, x: Tensor) -> Tensor:
        """``x`` detached, tensor-parallel slices gathered, and for a fused pre its own chunk."""
        x = full_width(x.detach(), self.layouts[index].get(stage))
        site = self.table.sites[index]
        if stage == "pre" and site.pre_chunk is not None:
            part, chunks = site.pre_chunk
            x = x.chunk(chunks, dim=-1)[part]  # Phi-3: the gate half of gate_up_proj
        return x
