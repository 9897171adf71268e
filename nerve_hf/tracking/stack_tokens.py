"""Token sources by name: which rows of each stack of a model count.

A model with several stacks (an encoder and a decoder, a vision tower and a language model) gives
each stack its own rows; the architecture table names the source of every site (``FFNSite.tokens``),
and :func:`sources_for_sites` makes one source per name for a tracker:

* ``"attention_mask"``: :class:`~nerve_hf.tracking.tokens.AttentionMaskTokens`, the call's mask (the
  default of every single-stack model);
* ``"encoder"``: :class:`EncoderTokens`, the call's ``attention_mask`` on the encoder's ``[B, T_src, D]``
  rows; no mask: every row;
* ``"decoder"``: :class:`DecoderTokens`, the call's ``decoder_attention_mask`` when given, else the
  positions whose ``labels`` are not ``-100`` (the positions the model's loss counts), else every row;
  except inside ``generate`` (``Seq2SeqTrainer(predict_with_generate=True)``, or a user's call): its
  decoder steps, with neither, read generated tokens (beams, one cached token per step, the pads of
  finished sequences), not the batch's target tokens, and count no rows. The teacher-forced forward
  with ``labels`` that ``Seq2SeqTrainer`` runs after ``generate`` is the one measured; the encoder
  ``generate`` runs as a submodule is outside any top-level forward and is not counted either;
* ``"encoder_window"``: :class:`WindowPaddedEncoderTokens`, the encoder's mask extended with padding up to
  the activations' length, for encoders that pad their input to a multiple of an attention window inside
  the model (LED);
* ``"all"``: :class:`AllRowsTokens`, every row (a vision tower's patches, an audio encoder's frames).

A mask is applied only to the stack it belongs to, and only to activations whose leading shape is the
mask's ``[B, T]``; a source that cannot tell which rows are real (a decoder activation whose length is
not the mask's, flat patch rows when only some samples count) warns once and counts none of that
activation's rows rather than the wrong ones.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from nerve_hf.integrations.trainer_internals import in_generation
from nerve_hf.tracking.call_inputs import WarnOnce, batch_size
from nerve_hf.tracking.tokens import AttentionMaskTokens, TokenSource, _on_host_path, select_by_mask

__all__ = [
    "StackTokens",
    "AllRowsTokens",
    "EncoderTokens",
    "WindowPaddedEncoderTokens",
    "DecoderTokens",
    "TOKEN_SOURCES",
    "register_token_source",
    "sources_for_sites",
]

IGNORE_INDEX = -100  # the label value transformers' losses leave out


def _positional_index(root: nn.Module, name: str) -> Optional[int]:
    """Positional index of the parameter ``name`` in ``root.forward``, or None."""
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


class StackTokens(TokenSource):
    """Rows of one stack: those a ``[B, T]`` mask of that stack keeps, or every row without one.

    Subclasses say where the stack's mask comes from (:meth:`stack_mask`). With a mask, only activations
    ``[B, T, D]`` of the mask's ``[B, T]`` are selected; any other shape counts no rows (warned once).
    Without a mask every row counts; ``keep_samples`` then keeps the leading samples of activations
    whose first axis is the call's batch, and counts no rows of others (warned once).

    Args:
        root: the unwrapped model, whose ``forward`` signature says where positional arguments sit.
    """

    arguments: tuple[str, ...] = ()  # the call arguments stack_mask reads

    def __init__(self, root: nn.Module) -> None:
        self._positions_of = {name: _positional_index(root, name) for name in self.arguments}
        self._warn = WarnOnce()
        self.end()

    def argument(self, args: tuple, kwargs: dict, name: str):
        """The call's argument ``name``, by keyword or at its positional index; None if not given."""
        value = kwargs.get(name)
        index = self._positions_of.get(name)
        if value is None and index is not None and len(args) > index:
            value = args[index]
        return value

    def stack_mask(self, args: tuple, kwargs: dict) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(mask [B, T] bool, positions [B, T] int64)`` of this stack for this call, or ``(None, None)``:
        every row counts."""
        return None, None

    def skips(self, args: tuple, kwargs: dict) -> bool:
        """Whether this call's rows are none of this stack's data tokens (counted: none, not warned)."""
        return False

    def begin(self, args: tuple, kwargs: dict, keep_samples=None) -> None:
        self.end()
        self._skip = self.skips(args, kwargs)
        self._mask, self._at = self.stack_mask(args, kwargs)
        if keep_samples is None:
            return
        batch = self._mask.shape[0] if self._mask is not None else batch_size(args, kwargs)
        keep = keep_samples(batch) if batch is not None else None
        if keep is None or keep >= batch:
            return
        if self._mask is not None:
            self._mask = self._mask.clone()
            self._mask[max(int(keep), 0) :] = False
        else:
            self._batch, self._keep = batch, max(int(keep), 0)

    def end(self) -> None:
        self._skip = False  # this call counts no rows (see skips)
        self._mask: Optional[Tensor] = None  # [B, T] bool of the running top-level forward
        self._at: Optional[Tensor] = None  # [B, T] int64 positions of the mask's rows
        self._batch: Optional[int] = None  # B of the call when only its first _keep samples count
        self._keep: Optional[int] = None
        self._rows: dict[torch.device, Tensor] = {}  # device -> the mask's True rows (or the mask itself)

    def _decidable(self, x: Tensor) -> bool:
        """Whether this source can tell the real rows of ``x`` (warns once when it cannot); False for a
        call it skips."""
        if self._skip:
            return False
        if self._mask is not None and tuple(x.shape[:-1]) != tuple(self._mask.shape):
            self._warn(
                f"shape-{type(self).__name__}",
                f"FFNTracker: {self.describe()} mask {tuple(self._mask.shape)} does not fit activations "
                f"{tuple(x.shape)}; their rows are not counted",
            )
            return False
        if self._keep is not None and (x.ndim < 3 or x.shape[0] != self._batch):
            self._warn(
                f"keep-{type(self).__name__}",
                f"FFNTracker: cannot tell which rows of activations {tuple(x.shape)} belong to the first "
                f"{self._keep} of {self._batch} samples; their rows are not counted",
            )
            return False
        return True

    def describe(self) -> str:
        return type(self).__name__

    def token_shape(self, n: int) -> tuple[int, ...]:
        """The mask's ``[B, T]`` when it holds ``n`` rows: a routed-experts call flattens the block's
        ``[B, T, D]`` input row-major, so its rows are the mask's (only that call says so)."""
        return tuple(self._mask.shape) if self._mask is not None and self._mask.numel() == n else (n,)

    def select(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Host path: the real rows ``([N, D], None)``; device path: all rows and a ``[B*T]`` keep mask."""
        flat = x.reshape(-1, x.shape[-1])  # [M, D]
        if not self._decidable(x):
            return flat[:0], None  # [0, D]
        if self._mask is None:
            return (flat if self._keep is None else x[: self._keep].reshape(-1, x.shape[-1])), None
        return select_by_mask(flat, self._mask, self._rows)

    def positions(self, x: Tensor) -> Optional[Tensor]:
        """Each selected row's position in its sequence: from the stack's mask, else the index along the
        sequence axis (dim -2); None for flat rows (``[M, D]``: no sequence axis)."""
        if not self._decidable(x):
            return torch.zeros(0, dtype=torch.long, device=x.device)
        if self._mask is not None:
            at = self._at.reshape(-1).to(x.device)  # [B*T]
            return at[self._mask.reshape(-1).to(x.device)] if _on_host_path(x.device) else at
        if x.ndim < 3:
            self._warn("positions", f"FFNTracker: activations {tuple(x.shape)} show no sequence axis; "
                                    f"their rows are left out of the position buckets")  # fmt: skip
            return None
        lead = tuple(x.shape[:-1])
        if self._keep is not None:
            lead = (min(self._keep, lead[0]), *lead[1:])
        return torch.arange(lead[-1], device=x.device).expand(lead).reshape(-1)  # [N]


def _as_mask(value, name: str, warn: WarnOnce) -> Optional[Tensor]:
    """``value`` as a ``[B, T]`` bool mask (nonzero = real), None if not a tensor; a mask of another
    rank is refused by a mask that keeps nothing (warned once)."""
    if not isinstance(value, Tensor):
        return None
    if value.ndim != 2:
        warn(f"ndim-{name}", f"FFNTracker: {name} of shape {tuple(value.shape)} is not [batch, seq]; rows not counted")
        return torch.zeros(1, 0, dtype=torch.bool, device=value.device)  # fits no activation
    return value.detach() != 0


def _counted_positions(mask: Tensor) -> Tensor:
    """``[B, T]`` position of each token among the real tokens of its row (left padding does not shift it)."""
    return mask.long().cumsum(-1) - 1


class AllRowsTokens(StackTokens):
    """Every row: a vision tower's patches (and class token), an audio encoder's frames."""


class EncoderTokens(StackTokens):
    """The encoder's rows: the call's ``attention_mask`` over ``[B, T_src, D]``; no mask: every row."""

    arguments = ("attention_mask",)

    def describe(self) -> str:
        return "the encoder's attention_mask"

    def stack_mask(self, args, kwargs):
        mask = _as_mask(self.argument(args, kwargs, "attention_mask"), "attention_mask", self._warn)
        return mask, None if mask is None else _counted_positions(mask)


class WindowPaddedEncoderTokens(EncoderTokens):
    """An encoder that pads its input on the right inside the model (LED pads ``input_ids`` and the mask to
    a multiple of its attention window): rows ``[B, T_pad, D]`` past the call's ``[B, T]`` mask are that
    padding and never count; the mask is extended with False to the activations' length. A call without a
    mask has every position of its ``input_ids`` (or ``inputs_embeds``) real, and still none of that padding."""

    arguments = ("attention_mask", "input_ids", "inputs_embeds")

    def describe(self) -> str:
        return "the encoder's attention_mask (padded to the attention window)"

    def stack_mask(self, args, kwargs):
        mask, positions = super().stack_mask(args, kwargs)
        if mask is not None:
            return mask, positions
        given = self.argument(args, kwargs, "input_ids")
        if not isinstance(given, Tensor):
            given = self.argument(args, kwargs, "inputs_embeds")
        if not isinstance(given, Tensor) or given.ndim < 2:
            return None, None
        mask = torch.ones(given.shape[:2], dtype=torch.bool, device=given.device)  # [B, T]: every given token
        return mask, _counted_positions(mask)

    def _fit(self, x: Tensor) -> None:
        mask = self._mask
        if mask is None or x.ndim != 3 or x.shape[0] != mask.shape[0] or x.shape[1] <= mask.shape[1]:
            return
        pad = x.shape[1] - mask.shape[1]
        self._mask = torch.nn.functional.pad(mask, (0, pad), value=False)  # [B, T_pad]
        self._at = torch.nn.functional.pad(self._at, (0, pad), value=0)  # [B, T_pad]; padding rows never count
        self._rows = {}

    def select(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        self._fit(x)
        return super().select(x)

    def positions(self, x: Tensor) -> Optional[Tensor]:
        self._fit(x)
        return super().positions(x)


class DecoderTokens(StackTokens):
    """The decoder's rows: ``decoder_attention_mask`` when the call gives one, else the positions whose
    ``labels`` are not -100 (the tokens the model's loss counts; positions are then indices along the
    target), else every row. A call with neither inside ``generate`` is a decoding step over generated
    tokens: none of its rows count."""

    arguments = ("decoder_attention_mask", "labels")

    def skips(self, args, kwargs):
        given = (self.argument(args, kwargs, name) for name in self.arguments)
        return all(value is None for value in given) and in_generation()

    def describe(self) -> str:
        return "the decoder's (decoder_attention_mask or labels)"

    def stack_mask(self, args, kwargs):
        mask = _as_mask(self.argument(args, kwargs, "decoder_attention_mask"), "decoder_attention_mask", self._warn)
        if mask is not None:
            return mask, _counted_positions(mask)
        labels = self.argument(args, kwargs, "labels")
        if not isinstance(labels, Tensor) or labels.is_floating_point():
            return None, None
        mask = _as_mask(labels.detach() != IGNORE_INDEX, "labels", self._warn)
        positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape) if mask.ndim == 2 else mask
        return mask, positions


# name (FFNSite.tokens) -> factory called with the unwrapped model
TOKEN_SOURCES: dict[str, Callable[[nn.Module], TokenSource]] = {
    "attention_mask": AttentionMaskTokens,
    "encoder": EncoderTokens,
    "encoder_window": WindowPaddedEncoderTokens,
    "decoder": DecoderTokens,
    "all": AllRowsTokens,
}


def register_token_source(name: str, factory: Callable[[nn.Module], TokenSource], overwrite: bool = False) -> None:
    """Make ``name`` usable as an ``FFNSite.tokens``; ``factory(root)`` returns a fresh source."""
    if name in TOKEN_SOURCES and not overwrite:
        raise ValueError(f"a token source {name!r} is already registered; pass overwrite=True to replace it")
    TOKEN_SOURCES[name] = factory


def sources_for_sites(root: nn.Module, sites: Iterable, override: Optional[TokenSource] = None):
    """The function from a site to its token source: ``override`` for every site when given, else one
    source per ``site.tokens`` name (made once, shared by the sites of that name).

    Raises:
        ValueError: a site names a token source that is not registered.
    """
    if override is not None:
        return lambda site: override
    names = sorted({site.tokens for site in sites})
    unknown = [name for name in names if name not in TOKEN_SOURCES]
    if unknown:
        raise ValueError(
            f"unknown token source(s) {unknown} in the adapter; known: {sorted(TOKEN_SOURCES)} "
            f"(nerve_hf.tracking.stack_tokens.register_token_source adds one)"
        )
    made = {name: TOKEN_SOURCES[name](root) for name in names}
    return lambda site: made[site.tokens]
