"""Every use of torch's private FSDP2 / DTensor internals, in one place, behind one version gate.

zo_kernels runs its fused op in place on FSDP2's shards.  For that it needs four things torch does
not expose publicly (used here with torch 2.13; FSDP2 is public from torch 2.6, and these names are
looked up, not assumed):

* `torch.distributed.tensor._utils.compute_local_shape_and_global_offset`: where a shard sits;
* `torch.distributed._composable_state._module_state_mapping` and `FSDPModule._get_fsdp_state()`:
  which FSDP2 states exist, to find the modules that own a parameter (they must `reshard()` after
  the shards are written, or the root keeps serving its stale all-gathered weights);
* an FSDP state's `_fsdp_param_groups` (torch >= 2.8; `_fsdp_param_group` before), whose
  `fsdp_params` have `sharded_param` and `_unsharded_param`;
* a DTensor's `_spec` (identity of its sharding, to cache the offset).

`require()` checks them once and raises one error naming what this torch lacks; everything else
here assumes they are present.  Plain tensors never reach this module.
"""
from __future__ import annotations

from typing import Optional

import torch

MIN_TORCH = (2, 6)          # fully_shard public in torch.distributed.fsdp
_missing: Optional[str] = None
_checked = False


def _torch_version() -> tuple:
    parts = []
    for p in torch.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _probe() -> Optional[str]:
    if _torch_version() < MIN_TORCH:
        return f"torch >= {'.'.join(map(str, MIN_TORCH))} (FSDP2's fully_shard)"
    try:
        from torch.distributed._composable_state import _module_state_mapping  # noqa: F401
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: F401
    except ImportError as e:
        return f"an internal torch.distributed name ({e})"
    if not hasattr(FSDPModule, "_get_fsdp_state"):
        return "FSDPModule._get_fsdp_state"
    return None


def require() -> None:
    """Raise one clear error when this torch lacks the internals zo_kernels' FSDP2 support uses."""
    global _missing, _checked
    if not _checked:
        _missing, _checked = _probe(), True
    if _missing is not None:
        raise RuntimeError(f"zo_kernels' FSDP2 (DTensor) support needs {_missing}, which torch {torch.__version__} "
                           f"lacks; use plain data parallel (distributed=True with replicated weights) or a torch "
                           f"in {'.'.join(map(str, MIN_TORCH))}+ that has it")


def local_shape_and_offset(t):
    """(local shape, global offset per dim) of a DTensor's local shard, from its placements."""
    require()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)


def spec(t):
    """The DTensor's sharding spec object (changes identity when the sharding changes)."""
    return getattr(t, "_spec", None)


def states():
    """(module, FSDP state) for every module fully_shard was applied to in this process."""
    require()
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule
    out, seen = [], set()
    for mod in list(_module_state_mapping.keys()):
        if isinstance(mod, FSDPModule):
            st = mod._get_fsdp_state()
            if id(st) not in seen:
                seen.add(id(st))
                out.append((mod, st))
    return out


def state_of(module):
    """The FSDP state of one fully_shard-ed module."""
    require()
    return module._get_fsdp_state()


def param_groups_of(state) -> list:
    """An FSDP state's parameter groups (one per state before torch 2.8)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        g = getattr(state, "_fsdp_param_group", None)
        groups = [] if g is None else [g]
    return list(groups)


def unsharded_param(fsdp_param):
    """The all-gathered parameter FSDP2 swaps in for a forward (None before the first one)."""
    return getattr(fsdp_param, "_unsharded_param", None)
