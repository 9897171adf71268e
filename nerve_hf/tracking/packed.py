"""Packed and padding-free batches: which rows are real and where each token sits in its own sequence.

Padding-free collators concatenate a batch's sequences into one row and pass no ``attention_mask``;
the sequence boundaries travel in ``position_ids`` (restarting at each sequence) or in the
flash-attention kwargs ``cu_seq_lens_q`` (cumulative sequence lengths over the flattened batch).
:class:`PackedRows` reads them from the top-level call and gives ``[B, T]`` real-token flags and
positions, vectorised (no host sync, so it runs on the device path too):

* **positions**: with ``position_ids`` (``[B, T]``, ``[1, T]`` or ``[T]``), each token's own value, which
  is its index in its own sequence for the collators below (the model's position embeddings read the
  same value); with ``cu_seq_lens_q`` alone, the token's flat index minus its sequence's start offset.
* **padding** (the rule): a token is padding when it belongs to the trailing run of its row in which
  every token has position 0 *and* is the model's pad token (``config.pad_token_id``, which TRL's
  ``SFTTrainer`` sets from its tokenizer); with ``cu_seq_lens_q``, every token past its last offset is
  padding too. This is exact for the padding-free collators of transformers and TRL:

  - transformers ``DataCollatorWithFlattening`` never pads: positions restart at ``position_ids_start``
    for each sequence, no trailing run exists unless the batch's last sequence is the single pad token;
  - TRL ``DataCollatorForLanguageModeling(padding_free=True, pad_to_multiple_of=m)`` appends
    ``input_ids = pad_token_id`` with ``position_ids = 0`` (each pad its own length-1 "sequence" in
    ``cu_seq_lens``) after the last real token. The last real sequence ends with a token at position > 0
    (a sequence of two or more tokens), so the run stops exactly at the padding.

  The one input the rule cannot tell apart is a batch whose last sequence is a single token equal to the
  pad token: it is counted as padding (such a sequence contributes no loss in TRL, whose labels are
  -100 at every position 0).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from nerve_hf.tracking.call_inputs import argument_position

__all__ = ["PackedRows"]


def _pad_token_id(root: nn.Module) -> Optional[int]:
    """The model's pad token (its text config's, for multimodal configs), or None."""
    config = getattr(root, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad = getattr(text, "pad_token_id", None)
    return pad if isinstance(pad, int) else None


def trailing_padding(
    positions: Tensor, ids: Optional[Tensor], pad_token_id: Optional[int], outside: Optional[Tensor] = None
) -> Tensor:
    """``[B, T]`` bool: the trailing run of each row whose tokens have position 0 and are ``pad_token_id``,
    or lie ``outside`` every sequence (``[B, T]`` bool; None: none do)."""
    padlike = torch.zeros_like(positions, dtype=torch.bool)  # [B, T]
    if ids is not None and pad_token_id is not None:
        padlike = (positions == 0) & (ids == pad_token_id)
    if outside is not None:
        padlike = padlike | outside
    # a token is in the trailing run when it and every token after it are padlike
    return padlike.flip(-1).long().cumprod(-1).flip(-1).bool()  # [B, T]


class PackedRows:
    """The real tokens and in-sequence positions of a call without ``attention_mask`` (module docstring).

    Args:
        root: the unwrapped model: its ``forward`` signature says where positional ``input_ids`` and
            ``position_ids`` sit, its config gives the pad token.
    """

    def __init__(self, root: nn.Module) -> None:
        self._ids_at = argument_position(root, "input_ids")
        self._positions_at = argument_position(root, "position_ids")
        self._root = root

    def _argument(self, args: tuple, kwargs: dict, name: str, at: Optional[int]) -> Optional[Tensor]:
        value = kwargs.get(name)
        if value is None and at is not None and len(args) > at:
            value = args[at]
        return value.detach() if isinstance(value, Tensor) else None

    def read(self, args: tuple, kwargs: dict) -> Optional[tuple[Tensor, Tensor]]:
        """``(real [B, T] bool, positions [B, T] int64)`` from the call's ``position_ids`` (else its
        ``cu_seq_lens_q``), or None when it has neither in a usable shape."""
        ids = self._argument(args, kwargs, "input_ids", self._ids_at)
        if ids is not None and (ids.ndim != 2 or ids.is_floating_point()):
            ids = None
        embeds = kwargs.get("inputs_embeds")
        lead = ids.shape if ids is not None else embeds.shape[:2] if isinstance(embeds, Tensor) else None
        pad = _pad_token_id(self._root)
        position_ids = self._argument(args, kwargs, "position_ids", self._positions_at)
        if position_ids is not None and position_ids.ndim in (1, 2):
            positions = position_ids.reshape(-1, position_ids.shape[-1]).long()  # [B or 1, T]
            if lead is not None:
                if lead[-1] != positions.shape[-1] or positions.shape[0] not in (1, lead[0]):
                    return None
                positions = positions.expand(lead)  # [B, T]
            if ids is not None:
                positions = positions.to(ids.device)
            return ~trailing_padding(positions, ids, pad), positions
        offsets = kwargs.get("cu_seq_lens_q")
        if isinstance(offsets, Tensor) and offsets.ndim == 1 and offsets.numel() >= 2 and ids is not None:
            return self._from_offsets(offsets.detach().to(ids.device).long(), ids, pad)
        return None

    @staticmethod
    def _from_offsets(offsets: Tensor, ids: Tensor, pad: Optional[int]) -> tuple[Tensor, Tensor]:
        """Real tokens and positions of ``ids`` [B, T] from cumulative sequence lengths ``offsets`` [S+1]
        over the flattened batch."""
        flat = torch.arange(ids.numel(), device=ids.device)  # [B*T]
        sequence = (torch.searchsorted(offsets, flat, right=True) - 1).clamp(0, offsets.numel() - 2)  # [B*T]
        positions = (flat - offsets[sequence]).reshape(ids.shape)  # [B, T]
        outside = (flat >= offsets[-1]).reshape(ids.shape)  # [B, T]: past the last sequence
        return ~trailing_padding(positions, ids, pad, outside), positions
