"""The one place where nerve_hf talks to other processes.

Every cross-process reduction in the package goes through :func:`all_reduce_sum`. It works with any
initialised ``torch.distributed`` process group, which is what ``torchrun``, ``accelerate launch`` and
the Trainer set up, and is a no-op in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "rank", "is_main_process", "all_reduce_sum"]


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes, in place, and return it (unchanged on one process).

    The reduction runs on the tensor's own device and dtype (float64 stays float64), so sums of
    sufficient statistics are exact up to float64 addition order.
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
