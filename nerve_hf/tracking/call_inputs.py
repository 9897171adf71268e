"""What a forward hook needs to know about a call: its inputs, its batch, and whether autograd runs it.

Helpers of the hook points (:mod:`nerve_hf.tracking.points`) and token sources
(:mod:`nerve_hf.tracking.tokens`); the only state kept here is :class:`WarnOnce`'s set of warnings given.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor, nn

__all__ = [
    "check_no_replicating_data_parallel",
    "in_backward",
    "eager",
    "first_tensor",
    "batch_size",
    "mask_position",
    "argument_position",
    "WarnOnce",
]


class WarnOnce:
    """Give each warning (by key) once per owner: a hook firing every forward warns the first time only."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.given:
            self.given.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def check_no_replicating_data_parallel(model: nn.Module) -> None:
    """ValueError for ``nn.DataParallel`` over several devices: it runs copies of the model in threads,
    each on a slice of the batch, which the token masks and the accumulators cannot follow."""
    for module in model.modules():  # the wrapper itself, or one nested inside other wrappers
        if isinstance(module, nn.DataParallel) and len(module.device_ids) > 1:
            raise ValueError(
                f"nn.DataParallel over {len(module.device_ids)} devices is not supported: it runs replicas of "
                f"the model in threads on slices of the batch. Use DistributedDataParallel (torchrun or "
                f"accelerate launch), whose processes are reduced exactly, or one device."
            )


def in_backward() -> bool:
    """True while the autograd engine runs (where checkpointing recomputes forwards)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def eager(hook):
    """Run ``hook`` eagerly under ``torch.compile``: dynamo breaks the graph around it instead of
    tracing the tracker's Python state and the accumulator's data-dependent checks."""
    return torch.compiler.disable(hook)


def first_tensor(value) -> Tensor | None:
    """The tensor itself, or the first tensor of a tuple/list/dict output."""
    if isinstance(value, Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return next((item for item in items if isinstance(item, Tensor)), None)


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """Leading size of the forward's main input (``input_ids``, ``inputs_embeds``, ``pixel_values`` or the
    first positional tensor), or None."""
    for name in ("input_ids", "inputs_embeds", "pixel_values", "input_values"):
        value = kwargs.get(name)
        if isinstance(value, Tensor) and value.ndim >= 1:
            return value.shape[0]
    first = first_tensor(args)
    return first.shape[0] if first is not None and first.ndim >= 1 else None


def mask_position(model: nn.Module) -> int | None:
    """Positional index of ``attention_mask`` in ``model.forward``, or None."""
    return argument_position(model, "attention_mask")


def argument_position(model: nn.Module, name: str) -> int | None:
    """Positional index of the argument ``name`` in ``model.forward``, or None."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None
