"""The one place where nerve_hf talks to other processes.

Every cross-process exchange in the package goes through these helpers. They work with any initialised
``torch.distributed`` process group (what ``torchrun``, ``accelerate launch`` and the Trainer set up),
take an optional ``group`` (default: every process), and are no-ops in a single process.

Groups: statistics are summed over the *data-parallel* ranks, the ones that see different tokens (and
sequence/context-parallel ranks, which see different positions of the same sequences). Ranks of a
tensor-parallel group hold column slices of the same tokens' activations and must never be summed.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "is_main_process",
    "all_reduce_sum",
    "reduce_scatter_sum",
    "reduce_sum",
    "all_gather",
    "any_true",
]


def is_distributed(group=None) -> bool:
    """True when a process group with more than one process is initialised (``group``'s, if given)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    """This process's rank within ``group`` (0 on one process)."""
    return dist.get_rank(group) if is_distributed(group) else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Sum ``tensor`` over the processes of ``group``, in place, and return it (unchanged on one process).

    The reduction runs on the tensor's own device and dtype (float64 stays float64), so sums of
    sufficient statistics are exact up to float64 addition order.
    """
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def reduce_scatter_sum(tensor: Tensor, group=None) -> Tensor:
    """``tensor`` ``[W * K]`` summed over ``group``; this process receives only its chunk ``[K]``
    (rank r: elements ``r*K .. (r+1)*K``). On one process: ``tensor`` itself."""
    size = world_size(group)
    if size == 1:
        return tensor
    if tensor.numel() % size:
        raise ValueError(f"reduce_scatter_sum needs a length divisible by {size}, got {tensor.numel()}")
    out = tensor.new_empty(tensor.numel() // size)
    dist.reduce_scatter_tensor(out, tensor, op=dist.ReduceOp.SUM, group=group)
    return out


def reduce_sum(tensor: Tensor, dst: int, group=None) -> Tensor:
    """Sum ``tensor`` over ``group`` into the process of group rank ``dst`` (in place there; the other
    processes' tensors are left undefined). On one process: ``tensor`` itself."""
    if is_distributed(group):
        target = dist.get_global_rank(group, dst) if group is not None else dst
        dist.reduce(tensor, dst=target, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather(tensor: Tensor, group=None) -> Tensor:
    """Every process's ``tensor`` ``[K]`` (the same K everywhere), concatenated in rank order: ``[W * K]``."""
    size = world_size(group)
    if size == 1:
        return tensor
    out = tensor.new_empty(size * tensor.numel())
    dist.all_gather_into_tensor(out, tensor, group=group)
    return out


def any_true(flag: bool, group=None) -> bool:
    """Whether ``flag`` is True on any process of ``group`` (one all-reduce of one number; ``flag`` itself on
    one process). Every process must call it at the same point."""
    if not is_distributed(group):
        return bool(flag)
    import torch

    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item() > 0)
