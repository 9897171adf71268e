"""Which rows of an FFN's activations count: the token source of a site, and the ``max_tokens`` cap.

A :class:`TokenSource` is told when a recorded top-level forward begins and ends, and turns each
activation ``[..., D]`` of a site into the rows that count. :class:`AttentionMaskTokens` is the one every
site gets today:

* the ``attention_mask`` of the top-level call (keyword, or positional at the index the model's
  ``forward`` gives it) selects the real tokens, as ``[B, T]`` bool, once per forward; the same selection
  applies to every ``[B, T, D]`` activation, and to ``[B*T, D]`` rows (OPT flattens tokens row-major
  before its FFN);
* ``keep_samples`` (the recording window's) drops the samples after the first n: from the mask, or,
  without one, the leading samples of ``[B, T, D]`` activations;
* on devices where reading a tensor on the host waits for the device
  (:attr:`~nerve_hf.stats.covariance.CovarianceAccumulator.HOST_SYNC_DEVICE_TYPES`: CPU is not one) it
  returns all rows and a keep mask instead of the real rows, so a hook never waits;
* without a mask, a packed or padding-free call (``position_ids``, or the flash-attention kwarg
  ``cu_seq_lens_q``) gives the real tokens and positions instead: the collators' trailing padding is
  left out and each token's position is its position in its own sequence
  (:class:`~nerve_hf.tracking.packed.PackedRows` states the rule);
* a token's position is the number of real tokens before it in its sequence (left padding does not
  shift it), or without a mask its index along the sequence axis.

:class:`TokenCap` applies ``max_tokens``: per site and stage, the first rows until the cap, counted per
window. Pre and post of an FFN see the same activations in the same order, so they keep the same tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.tracking.call_inputs import WarnOnce, batch_size, mask_position
from nerve_hf.tracking.packed import PackedRows

__all__ = ["TokenSource", "AttentionMaskTokens", "TokenCap", "select_by_mask"]


def _on_host_path(device: torch.device) -> bool:
    """True where selecting rows by index costs no wait for the device (the host path)."""
    return device.type in CovarianceAccumulator.HOST_SYNC_DEVICE_TYPES


def select_by_mask(flat: Tensor, mask: Tensor, cache: dict) -> tuple[Tensor, Optional[Tensor]]:
    """The rows of ``flat`` (``[B*T, D]``) that ``mask`` (``[B, T]`` bool) keeps. Host path: ``([N, D], None)``,
    the kept indices cached per device in ``cache``; device path: all rows and the mask ``[B*T]`` as the keep
    mask (no ``nonzero()``: it would wait for the device)."""
    rows = cache.get(flat.device)
    if not _on_host_path(flat.device):
        if rows is None:
            rows = cache[flat.device] = mask.reshape(-1).to(flat.device)  # [B*T] bool
        return flat, rows
    if rows is None:
        rows = cache[flat.device] = mask.reshape(-1).nonzero().squeeze(1).to(flat.device)  # [N]
    return flat.index_select(0, rows), None  # [N, D]


class TokenSource:
    """The rows of a site's activations that count. This base counts every row and knows no positions;
    subclasses override what they decide."""

    def begin(self, args: tuple, kwargs: dict, keep_samples: Optional[Callable[[int], Optional[int]]]) -> None:
        """A recorded top-level forward begins, called with ``args``/``kwargs``; ``keep_samples`` as for
        :class:`~nerve_hf.tracking.windows.Window`."""

    def end(self) -> None:
        """The top-level forward ended (or the hooks were removed): forget its inputs."""

    def select(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The rows of ``x`` ([..., D]) that count: ``([N, D], None)``, or all rows ``[M, D]`` and a
        ``[M]`` bool keep mask."""
        return x.reshape(-1, x.shape[-1]), None

    def positions(self, x: Tensor) -> Optional[Tensor]:
        """``[N]`` int64 position of each row :meth:`select` returns for ``x`` (one per row, kept or
        not), or None when unknown."""
        return None

    def token_shape(self, n: int) -> tuple[int, ...]:
        """The leading shape of ``n`` token rows that a block flattened row-major from its ``[B, T, D]``
        input (a routed-experts call's ``[N, D]``), as :meth:`select` reads rows: here ``(n,)``."""
        return (n,)


class AttentionMaskTokens(TokenSource):
    """The real tokens of the top-level call's ``attention_mask`` (see the module docstring).

    Args:
        root: the unwrapped model, whose ``forward`` signature says where a positional mask sits.
    """

    def __init__(self, root: nn.Module) -> None:
        self._mask_position = mask_position(root)
        self._packed = PackedRows(root)
        self._warn = WarnOnce()
        self.end()

    def begin(self, args: tuple, kwargs: dict, keep_samples=None) -> None:
        self.end()
        self._mask = self._find_mask(args, kwargs)
        if self._mask is None:
            packed = self._packed.read(args, kwargs)
            if packed is not None:
                self._mask, self._packed_positions = packed  # [B, T] bool, [B, T] int64
                self._mask_from = "position_ids"
        if keep_samples is not None:
            self._limit_samples(args, kwargs, keep_samples)

    def end(self) -> None:
        self._mask: Optional[Tensor] = None  # [B, T] bool of the running top-level forward
        self._mask_from = "attention_mask"  # what gave the mask (named in warnings)
        self._packed_positions: Optional[Tensor] = None  # [B, T] int64 of a packed call without a mask
        self._keep: Optional[int] = None  # leading samples that count when there is no mask; None: all
        self._rows: dict[torch.device, Tensor] = {}  # device -> the mask's True rows (or the mask itself)
        self._positions: dict[tuple, Optional[Tensor]] = {}  # (device, shape) -> positions of the rows

    def _find_mask(self, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """The ``attention_mask`` of this call as ``[B, T]`` bool, or None."""
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        if not isinstance(mask, Tensor):
            return None
        if mask.ndim != 2:
            self._warn(
                "mask-ndim",
                f"FFNTracker: attention_mask of shape {tuple(mask.shape)} is not [batch, seq]; counting all tokens",
            )
            return None
        return mask.detach() != 0  # [B, T]

    def _limit_samples(self, args: tuple, kwargs: dict, keep_samples: Callable[[int], Optional[int]]) -> None:
        """Drop the samples after the first ``keep_samples(B)`` from the mask (or remember how many)."""
        batch = self._mask.shape[0] if self._mask is not None else batch_size(args, kwargs)
        if batch is None:
            return
        keep = keep_samples(batch)
        if keep is None or keep >= batch:
            return
        keep = max(int(keep), 0)
        if self._mask is not None:
            self._mask = self._mask.clone()
            self._mask[keep:] = False
        else:
            self._keep = keep

    def _matches_mask(self, x: Tensor) -> bool:
        """Whether ``x`` is ``[B, T, D]`` or ``[B*T, D]`` for the mask's ``[B, T]``."""
        return tuple(x.shape[:-1]) in (tuple(self._mask.shape), (self._mask.numel(),))

    def select(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Host path: the real rows ``([N, D], None)``; device path: all rows ``[B*T, D]`` and the mask
        ``[B*T]`` bool (no ``nonzero()``: it would wait for the device)."""
        if self._mask is None and self._keep is not None:
            if x.ndim < 3:
                self._warn(
                    "keep-flat",
                    f"FFNTracker: cannot leave out repeated samples of activations {tuple(x.shape)} without an "
                    f"attention_mask; counting all their rows",
                )
            else:
                x = x[: self._keep]  # [keep, T, D]
        flat = x.reshape(-1, x.shape[-1])  # [B*T, D]
        if self._mask is None:
            return flat, None
        if not self._matches_mask(x):
            self._warn(
                "mask-shape",
                f"FFNTracker: {self._mask_from} {tuple(self._mask.shape)} does not match activations "
                f"{tuple(x.shape)}; counting all their rows",
            )
            return flat, None
        return select_by_mask(flat, self._mask, self._rows)

    def positions(self, x: Tensor) -> Optional[Tensor]:
        """With a mask, ``attention_mask.cumsum(-1) - 1`` of each selected row (a packed call: its
        in-sequence positions); without one, the index along the sequence axis (dim -2); None for flat
        rows without a mask (warned once)."""
        key = (x.device, tuple(x.shape))
        if key in self._positions:
            return self._positions[key]
        positions = None
        lead = tuple(x.shape[:-1])
        if self._mask is not None and self._matches_mask(x):
            counted = self._packed_positions if self._packed_positions is not None else self._mask.long().cumsum(-1) - 1
            counted = counted.reshape(-1).to(x.device)  # [B*T]
            if _on_host_path(x.device):  # select kept the real rows
                counted = counted[self._mask.reshape(-1).to(x.device)]  # [N]
            positions = counted
        elif x.ndim >= 3:
            if self._mask is None and self._keep is not None:
                lead = (min(self._keep, lead[0]), *lead[1:])
            positions = torch.arange(lead[-1], device=x.device).expand(lead).reshape(-1)  # [N]
        else:
            self._warn(
                "positions",
                f"FFNTracker: activations {tuple(x.shape)} without an attention_mask show no sequence axis; "
                f"their rows are left out of the position buckets",
            )
        self._positions[key] = positions
        return positions


class TokenCap:
    """``max_tokens`` of one window: per (site, stage), the first rows offered until ``limit``.

    On the host path (rows without a keep mask) the rows past the cap are cut off; on the device path the
    rows offered so far stay a device count and the cap joins the keep mask (no host sync).
    """

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.offered: dict[tuple[int, str], int | Tensor] = {}  # (site, stage) -> rows offered this window

    def apply(self, site: int, stage: str, rows: Tensor, keep: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """The rows (``[N, D]``, ``keep`` ``[N]`` bool or None) within the cap."""
        if self.limit is None:
            return rows, keep
        key = (site, stage)
        offered = self.offered.get(key, 0)
        if keep is None and _on_host_path(rows.device):
            self.offered[key] = offered + rows.shape[0]
            return rows[: max(self.limit - offered, 0)], None
        if rows.shape[0] == 0:
            return rows, keep
        if keep is None:
            keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        running = offered + keep.cumsum(0)  # [N]: rows offered up to and including each
        self.offered[key] = running[-1]
        return rows, keep & (running <= self.limit)

    def reset(self) -> None:
        self.offered = {}
