"""The tracked FFN sites and their widths: the hook points learn widths, the measurements size their state by them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from model_adapters import ResolvedSite

__all__ = ["SiteTable"]


@dataclass
class SiteTable:
    """The sites a tracker measures, in report order, and their widths as far as known.

    Attributes:
        sites: the resolved FFN sites.
        dims: per site, D, the width of pre and post (None until known: modules that are not
            Linear-like get it from their first activation).
        stage_dims: per site, ``{"input": d, "output": d}``, the widths of the FFN's input (the up/gate
            projection's input) and output (the down projection's output), None until known.
        device: where measurements keep their float64 state; None: the activations' device.
    """

    sites: list[ResolvedSite]
    dims: list[Optional[int]]
    stage_dims: list[dict[str, Optional[int]]]
    device: Optional[torch.device | str] = None

    def width(self, index: int, stage: str) -> Optional[int]:
        """The width of ``stage`` (``input``, ``pre``, ``post`` or ``output``) at site ``index``."""
        return self.dims[index] if stage in ("pre", "post") else self.stage_dims[index].get(stage)

    def learn(self, index: int, stage: str, width: int) -> None:
        """``stage``'s width at site ``index``, read from an activation (pre and post share D)."""
        if stage in ("pre", "post"):
            self.dims[index] = width
        else:
            self.stage_dims[index][stage] = width
