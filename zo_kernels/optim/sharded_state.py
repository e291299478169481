"""Optimizer state of parameters that may be FSDP2 shards (DTensors), kept the way torch.optim keeps it.

torch.optim stores per-parameter state shaped like the parameter: for a DTensor parameter the state
is a DTensor with the same mesh and placements (`torch.zeros_like(p)` in adam.py), so each rank holds
only the state of its own shard, and `torch.distributed.checkpoint` saves and reshards it like the
weights.  The ZO optimizers do the same: dense momentum and Adam's m, v are DTensors of the
parameter's global shape; LOZO-M's U-space momentum of a matrix is a DTensor of global shape
(rows, r) with the parameter's placements, so a rank's local rows of it are the U rows of its dim-0
shard (U's rows are global; see zo_kernels.lowrank).  The fused passes run on the local tensors,
at the shard's global offsets, exactly as the weights' passes do.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import distributed as _zdist


def _contiguous_stride(shape: Sequence[int]) -> tuple:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def shard_like(p: torch.Tensor, local: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """State tensor for parameter p from this rank's part `local`: `local` itself for a plain p, else
    a DTensor of global `shape` (default p's; dim 0 must be p's) placed like p."""
    if not _zdist.is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor
    shape = tuple(p.shape) if shape is None else tuple(shape)
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def zeros_state(p: torch.Tensor, shape: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """Zero state (float32 unless `dtype`) for p: p's shape (or `shape`, same dim 0), sharded like p when p is a
    DTensor."""
    if not _zdist.is_dtensor(p):
        return torch.zeros(p.shape if shape is None else shape, dtype=dtype, device=p.device)
    local, _ = _zdist.local_shard(p)
    local_shape = tuple(local.shape) if shape is None else (local.shape[0],) + tuple(shape)[1:]
    return shard_like(p, torch.zeros(local_shape, dtype=dtype, device=local.device), shape)


def local_state(value: torch.Tensor) -> torch.Tensor:
    """The tensor a fused pass reads and writes: a DTensor state's local tensor (its storage)."""
    return value.to_local() if _zdist.is_dtensor(value) else value


def check_state(p: torch.Tensor, value, name: str) -> None:
    """Refuse state that does not fit p's sharding (a loaded state_dict): a DTensor parameter needs
    DTensor state on the same mesh and placements with p's dim 0; a plain parameter plain state."""
    if not isinstance(value, torch.Tensor):
        return
    if _zdist.is_dtensor(p):
        if not _zdist.is_dtensor(value):
            raise ValueError(f"{name} is a plain tensor of shape {tuple(value.shape)} but its parameter is a "
                             f"DTensor (sharded with {p.placements}): sharded parameters keep DTensor state; save "
                             f"and load the state_dict on the same sharding (torch.distributed.checkpoint reshards)")
        if (value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements)
                or value.dim() < 1 or value.shape[0] != p.shape[0]):
            raise ValueError(f"{name} is a DTensor of shape {tuple(value.shape)} with placements {value.placements} "
                             f"but its parameter has shape {tuple(p.shape)} and placements {p.placements}: state "
                             f"must be sharded like its parameter (load with torch.distributed.checkpoint to reshard)")
    elif _zdist.is_dtensor(value):
        raise ValueError(f"{name} is a DTensor (placements {value.placements}) but its parameter is a plain "
                         f"tensor: state saved from a sharded run loads into the same sharding")
