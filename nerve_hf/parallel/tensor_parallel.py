"""Tensor-parallel FFNs: the activations a hook sees are column slices; give the tracker the full width.

Under torch's ``parallelize_module`` with ``ColwiseParallel`` on the up/gate projections and
``RowwiseParallel`` on the down projection (the plan transformers' ``tp_plan`` applies too), each rank
of the tensor-parallel group computes D / W of the FFN's hidden columns, for the same tokens. A
covariance of that slice is not the FFN's spectrum, so at measured forwards only the tracker gathers
the slices of the rows it records across the group, in rank order (the order of the sharded weight's
rows): pre and post each move N · D · (W − 1) / W values per rank and FFN (4 bytes each in fp32).
A hook that meets a ``DTensor`` takes its ``full_tensor()``, the same exchange.

The ranks of a tensor-parallel group hold the same tokens, so their statistics must never be summed:
:func:`data_parallel_group` finds the group to sum over from the device mesh.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ShardedWidth", "sharded_width", "modules_under_fsdp", "full_width", "data_parallel_group", "NO_REDUCTION"]

NO_REDUCTION = "no-reduction"  # the tracker's group when every process already holds all the tokens


@dataclass(frozen=True)
class ShardedWidth:
    """A module whose activation on one side is split by columns over a tensor-parallel mesh dimension."""

    mesh: object  # torch.distributed.DeviceMesh
    mesh_dim: int  # the tensor-parallel dimension of the mesh
    width: int  # the full width D


@functools.cache
def _dtensor_types() -> tuple:
    """``(DTensor, Shard)``, imported once; ``((), None)`` for a torch without DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:
        return (), None
    return DTensor, Shard


def _dtensor_weight(module: nn.Module):
    dtensor, shard = _dtensor_types()
    weight = getattr(module, "weight", None)
    return (weight, shard) if isinstance(weight, dtensor) else (None, None)


def sharded_width(module: nn.Module, side: str, under_fsdp: bool = False) -> Optional[ShardedWidth]:
    """How ``module``'s ``side`` activation is split: the output of a colwise-sharded ``nn.Linear``
    (``"pre"``, weight ``[out, in]`` sharded on dim 0) or the input of a rowwise-sharded one (``"post"``,
    dim 1) over the tensor-parallel mesh dimension; else None.

    FSDP2 also keeps its parameters as DTensors sharded on dim 0, but gathers them for the forward, so
    its activations are whole: under an ``FSDPModule`` (``under_fsdp``) only a mesh dimension named
    ``"tp"`` counts as tensor-parallel.
    """
    weight, shard = _dtensor_weight(module)
    if weight is None or not isinstance(module, nn.Linear):
        return None
    weight_dim = 0 if side == "pre" else 1
    names = weight.device_mesh.mesh_dim_names or ()
    for mesh_dim, placement in enumerate(weight.placements):
        if not (isinstance(placement, shard) and placement.dim == weight_dim):
            continue
        if under_fsdp and (mesh_dim >= len(names) or names[mesh_dim] != "tp"):
            continue
        width = module.out_features if side == "pre" else module.in_features
        return ShardedWidth(weight.device_mesh, mesh_dim, width)
    return None


def modules_under_fsdp(model: nn.Module) -> set[int]:
    """``id`` of every module inside an FSDP2 ``fully_shard`` unit of ``model``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return set()
    return {id(sub) for module in model.modules() if isinstance(module, FSDPModule) for sub in module.modules()}


def full_width(x: Tensor, layout: Optional[ShardedWidth]) -> Tensor:
    """``x`` ``[..., D_local]`` with its columns gathered over the layout's group: ``[..., D]``.

    Collective: every rank of the group must call it for the same forward. Shards follow
    ``torch.chunk``'s sizes (the first ranks one column more when D is not divisible)."""
    if isinstance(x, _dtensor_types()[0]):
        return x.full_tensor()
    if layout is None or x.shape[-1] == layout.width:
        return x
    group = layout.mesh.get_group(layout.mesh_dim)
    world = dist.get_world_size(group)
    sizes = [len(part) for part in torch.arange(layout.width).chunk(world)]
    sizes += [0] * (world - len(sizes))
    widest = max(sizes)
    local = x.contiguous()
    if local.shape[-1] < widest:
        local = torch.nn.functional.pad(local, (0, widest - local.shape[-1]))
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.cat([part[..., :size] for part, size in zip(parts, sizes)], dim=-1)


def data_parallel_group(layouts: list[ShardedWidth]):
    """The group whose statistics a tracker sums when its FFNs are tensor-parallel: the mesh's other
    dimension of a 2-D (data, tensor) mesh, :data:`NO_REDUCTION` for a 1-D tensor-parallel mesh over
    every process. ValueError for other meshes: pass ``group=`` to the tracker."""
    meshes = {(id(layout.mesh), layout.mesh_dim) for layout in layouts}
    if len(meshes) > 1:
        raise ValueError("FFNTracker: the FFNs are sharded over different device meshes; pass group= explicitly")
    layout = layouts[0]
    mesh = layout.mesh
    if mesh.ndim == 1:
        if mesh.size() != dist.get_world_size():
            raise ValueError(
                "FFNTracker: tensor-parallel FFNs on a 1-D mesh smaller than the world; pass group= (the "
                "data-parallel group whose ranks see different tokens)"
            )
        return NO_REDUCTION
    if mesh.ndim == 2:
        return mesh.get_group(1 - layout.mesh_dim)
    raise ValueError(f"FFNTracker: a {mesh.ndim}-D device mesh; pass group= (the data-parallel group)")
