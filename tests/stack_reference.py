"""An independent float64 capture of FFN pre/post activations for models with several stacks.

The test names each FFN's modules itself (paths read from the transformers modeling files, never asked of
the library), hooks them (pre = the up/gate projection's output, post = the down projection's input) and
records, per top-level call of the model, the call's keyword arguments (an FFN running outside any
top-level call, as the encoder ``generate`` runs as a submodule, belongs to no call and is never kept).
Which rows are real is decided by the test from those arguments (``select``), so the library's token
sources are checked, not reused.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import pytest
import torch
from reference import activation_metrics
from torch import nn

from nerve_hf.report import METRIC_NAMES

Select = Callable[[dict, torch.Tensor], Optional[torch.Tensor]]  # (call kwargs, x [..., D]) -> bool [...] or None


class StackCapture:
    """Hooks ``sites`` (report name -> (pre path, post path)) of ``model`` and every top-level call."""

    def __init__(self, model: nn.Module, sites: dict[str, tuple[str, str]]) -> None:
        modules = dict(model.named_modules())
        self.calls: list[dict] = []
        self.depth = 0  # nesting of top-level calls running
        # site -> stage -> [(call index, activation float64)]
        self.seen: dict[str, dict[str, list]] = {name: {"pre": [], "post": []} for name in sites}
        self.handles = [
            model.register_forward_pre_hook(self._call, with_kwargs=True),
            model.register_forward_hook(self._call_ends, always_call=True),
        ]
        for name, (pre, post) in sites.items():
            self.handles.append(modules[pre].register_forward_hook(self._keep(name, "pre", output=True)))
            self.handles.append(modules[post].register_forward_pre_hook(self._keep(name, "post", output=False)))

    def _call(self, module, args, kwargs) -> None:
        self.depth += 1
        if self.depth == 1:
            self.calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def _call_ends(self, module, args, output) -> None:
        self.depth -= 1

    def _keep(self, name: str, stage: str, output: bool):
        def hook(module, args, *rest):
            x = rest[0] if output else args[0]
            call = len(self.calls) - 1 if self.depth > 0 else None
            self.seen[name][stage].append((call, x.detach().double().clone()))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def rows(self, name: str, select: Select, calls=None) -> tuple[np.ndarray, np.ndarray]:
        """``(pre [N, D], post [N, D])`` float64 of site ``name`` over the rows ``select`` keeps, in the
        top-level calls numbered ``calls`` (None: all)."""
        out = []
        for stage in ("pre", "post"):
            kept = []
            for call, x in self.seen[name][stage]:
                if call is None or (calls is not None and call not in calls):
                    continue
                mask = select(self.calls[call], x)
                kept.append(x.reshape(-1, x.shape[-1]) if mask is None else x[mask.bool()])
            out.append(torch.cat(kept).numpy())
        return out[0], out[1]


def assert_site(row: dict, pre: np.ndarray, post: np.ndarray, rtol: float = 1e-5) -> None:
    """The report row has exactly the reference's token count and width, and its metrics."""
    assert row["tokens"] == pre.shape[0] == post.shape[0], row["site"]
    assert row["dim"] == pre.shape[1], row["site"]
    expected = activation_metrics(pre, post)
    for metric in METRIC_NAMES:
        got, want = row[metric], expected[metric]
        assert got == pytest.approx(want, rel=rtol, abs=1e-7), (row["site"], metric, got, want)


def encoder_rows(call: dict, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The encoder's real rows: its attention_mask; rows past the mask's length are padding the model added
    (LED pads its sources to a multiple of its attention window)."""
    mask = call.get("attention_mask")
    if mask is None:
        return None
    return torch.nn.functional.pad(mask != 0, (0, x.shape[1] - mask.shape[1]), value=False)


def decoder_rows(call: dict, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The decoder's real rows: decoder_attention_mask, else the positions the loss counts (labels != -100)."""
    if call.get("decoder_attention_mask") is not None:
        return call["decoder_attention_mask"] != 0
    return None if call.get("labels") is None else call["labels"] != -100


def all_rows(call: dict, x: torch.Tensor) -> None:
    return None
