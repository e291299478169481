"""Data-parallel and FSDP2-sharded ZO training on torch.distributed.

Two ways to spread a ZO run over ranks (one process per GPU, started by torchrun):

* **Data parallel, replicated weights** (`MeZO(..., distributed=True)`): every rank holds the
  whole model.  In a step every rank evaluates *its part of the batch* at the same perturbed
  weights (the noise is a function of (seed, step, tensor id, element index), so all ranks
  perturb identically without exchanging anything), then the per-rank loss sums and example
  counts of all the step's forward passes go into **one** all-reduce of a few float64 scalars,
  and every rank applies the same fused update.  No weight or gradient traffic at all.
* **Sharded** (parameters that are DTensors, e.g. after FSDP2's `fully_shard`): the fused op runs
  on each rank's local shard in place, with the shard's global element offset, so z of the shard
  is that slice of the whole tensor's z and the trajectory equals the unsharded one.  The losses
  are reduced exactly as above; FSDP all-gathers the weights for each forward as usual.

The closure contract (both modes, zo_kernels.optim.closure): return the **mean** loss over this
rank's examples, or a pair `(mean_loss, count)`.  The optimizer combines ranks as
Σ_r mean_r·count_r / Σ_r count_r, the mean over the whole global batch; a plain scalar counts as 1,
which is right when every rank has the same number of examples.  A rank with count 0 contributes
nothing (its loss may be NaN).

Layout: this module is the public side; the optimizers' collectives are zo_kernels._comm, and every
use of torch's private FSDP2 / DTensor internals is zo_kernels._fsdp (one version gate, one error).

Guard: on the first step (and after `load_state_dict`) the ranks all-reduce (MAX) a 63-bit
fingerprint of (optimizer, seed, step, hyper-parameters, parameter layout) and a checksum of the
replicated weights; any disagreement raises `RankMismatchError` on every rank before a weight
moves.  Every later step also carries a 20-bit fingerprint inside the loss all-reduce (free: two
more scalars), so ranks that drift apart later are caught too.

Under torchrun:

    import zo_kernels.distributed as zdist
    on = zdist.init_from_env()              # no-op (False) without torchrun's environment
    device = zdist.local_device("cuda")     # cuda:LOCAL_RANK under torchrun
    opt = MeZO(model.parameters(), lr=1e-6, distributed=on)
    idx = zdist.shard_list(batch_indices)   # this rank's part of the (same-on-all-ranks) batch
    loss = opt.step(lambda: (model(**batch(idx)).loss, len(idx)))
"""
from __future__ import annotations

import hashlib
import os
import sys
import weakref
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch

from . import _fsdp

__all__ = ["RankMismatchError", "RankFailedError", "init_from_env", "destroy", "is_initialized", "get_rank",
           "get_world_size", "is_main_process", "local_device", "shard_range", "shard_list",
           "broadcast_parameters", "is_dtensor", "local_shard", "fsdp_modules_of", "fingerprint"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_M63 = (1 << 63) - 1
_M62 = (1 << 62) - 1
_STEP_BITS = 20
_initialised_here = False


class RankMismatchError(RuntimeError):
    """Ranks disagree on the seed, step, hyper-parameters, parameter layout or replicated weights."""


class RankFailedError(RuntimeError):
    """Another rank's closure raised in this step; the step was abandoned on every rank."""


# --------------------------------------------------------------------- process group
def _dist():
    import torch.distributed as dist
    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    """This process's rank in `group` (0 without torch.distributed)."""
    return _dist().get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    """Number of ranks in `group` (1 without torch.distributed)."""
    return _dist().get_world_size(group) if is_initialized() else 1


def is_main_process(group=None) -> bool:
    """True on rank 0 (and without torch.distributed): the rank that prints and writes files."""
    return get_rank(group) == 0


def init_from_env(backend: Optional[str] = None, timeout=None) -> bool:
    """Initialise the default process group from torchrun's environment; returns whether one exists.

    Without torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) this does nothing and
    returns False, so a script calls it unconditionally.  An already initialised group is kept
    (returns True).  backend: default "cuda:nccl,cpu:gloo" when CUDA is present (and the current
    CUDA device is set to LOCAL_RANK), else "gloo".  timeout: a datetime.timedelta, or None."""
    global _initialised_here
    if is_initialized():
        return True
    if not all(v in os.environ for v in _TORCHRUN_VARS):
        return False
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("torchrun environment found but this torch build has no torch.distributed")
    if backend is None:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cuda:nccl,cpu:gloo"
        else:
            backend = "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, **kwargs)
    _initialised_here = True
    return True


def destroy() -> None:
    """Tear down the process group if init_from_env created it (call at the end of the script)."""
    global _initialised_here
    if _initialised_here and is_initialized():
        _dist().destroy_process_group()
    _initialised_here = False


def local_device(default: str = "cpu") -> str:
    """The device this rank should use: "cuda:LOCAL_RANK" under torchrun when `default` is a CUDA
    device and CUDA is present, else `default` unchanged."""
    if default.startswith("cuda") and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return default


def shard_range(n: int, rank: Optional[int] = None, world: Optional[int] = None) -> range:
    """This rank's contiguous part of range(n): sizes differ by at most 1 (the first n % world
    ranks get one more).  Every rank must pass the same n."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    base, extra = divmod(int(n), world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_list(items: Sequence, rank: Optional[int] = None, world: Optional[int] = None) -> list:
    """This rank's contiguous part of a list (a global batch's indices, say) -- see shard_range."""
    items = list(items)
    r = shard_range(len(items), rank, world)
    return items[r.start:r.stop]


def broadcast_parameters(params, src: int = 0, group=None) -> None:
    """Copy rank `src`'s replicated (non-DTensor) parameters to every rank, in place.

    For data-parallel runs whose ranks might initialise differently (a randomly initialised head
    without a common seed).  params: an nn.Module or an iterable of tensors."""
    if not is_initialized():
        return
    if isinstance(params, torch.nn.Module):
        params = list(params.parameters())
    dist = _dist()
    with torch.no_grad():
        for p in params:
            if not is_dtensor(p):
                dist.broadcast(p.data, src=src, group=group)


# ------------------------------------------------------------------------ DTensor shards
def is_dtensor(t) -> bool:
    """True for a torch.distributed.tensor.DTensor (cheap: no import when DTensor was never loaded)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


_shard_cache: Dict[int, tuple] = {}    # id(DTensor) -> (weakref, spec, local shape, flat offset)


def _flat_offset(global_shape, local_shape, offset) -> int:
    """Global flat index of the local block's first element, when the block is one contiguous
    range of the whole tensor's row-major order; else NotImplementedError."""
    nd = len(global_shape)
    first = next((d for d in range(nd) if local_shape[d] != global_shape[d]), None)
    if first is not None:
        if any(global_shape[d] != 1 for d in range(first)) or \
                any(local_shape[d] != global_shape[d] for d in range(first + 1, nd)):
            raise NotImplementedError(
                f"a shard of shape {tuple(local_shape)} at offset {tuple(offset)} of a tensor of shape "
                f"{tuple(global_shape)} is not one contiguous range of its elements; ZO shards must be "
                f"split along the first dimension of size > 1 (FSDP2's default Shard(0))")
    flat, stride = 0, 1
    for d in reversed(range(nd)):
        flat += int(offset[d]) * stride
        stride *= int(global_shape[d])
    return flat


def local_shard(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(local tensor, global element offset of its first element).  Plain tensors: (t, 0).

    For a DTensor the local tensor is `t.to_local()` (the very storage FSDP2 all-gathers from, so
    in-place changes are what the next forward sees once the module is resharded) and the offset
    comes from its placements, e.g. Shard(0) of a (rows, cols) tensor: first row index × cols."""
    if not is_dtensor(t):
        return t, 0
    with torch.no_grad():
        local = t.to_local()
    spec = _fsdp.spec(t)
    hit = _shard_cache.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] is spec and hit[2] == tuple(local.shape):
        return local, hit[3]
    from torch.distributed.tensor import Partial
    if any(isinstance(pl, Partial) for pl in t.placements):
        raise ValueError(f"parameter with placements {t.placements}: Partial (pending-reduction) tensors "
                         f"cannot be perturbed in place")
    shape, off = _fsdp.local_shape_and_offset(t)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"DTensor of global shape {tuple(t.shape)} with placements {t.placements}: the "
                           f"local tensor has shape {tuple(local.shape)} but its placements say {tuple(shape)}")
    if local.numel() == 0:
        flat = 0
    else:
        if not local.is_contiguous():
            raise ValueError(f"the local shard of a DTensor of shape {tuple(t.shape)} is not contiguous")
        flat = _flat_offset(tuple(t.shape), tuple(shape), tuple(off))
    _shard_cache[id(t)] = (weakref.ref(t), spec, tuple(local.shape), flat)
    return local, flat


def fsdp_modules_of(params: Iterable[torch.Tensor]) -> list:
    """The FSDP2 modules (one per fully_shard call) whose sharded parameters include any of `params`.

    `module.reshard()` on them makes the next forward all-gather from the shards again; FSDP2's
    root module otherwise keeps its all-gathered weights after a no-grad forward."""
    ids = {id(p) for p in params}
    out = []
    for mod, st in _fsdp.states():
        if any(id(fp.sharded_param) in ids for pg in _fsdp.param_groups_of(st) for fp in pg.fsdp_params):
            out.append(mod)
    return out


def fingerprint(obj: Any) -> int:
    """A 63-bit hash of repr(obj) (blake2b): equal on every rank iff the reprs are equal."""
    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little") & _M63
