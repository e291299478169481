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

The closure contract (both modes): return the **mean** loss over this rank's examples, or a pair
`(mean_loss, count)`.  The optimizer combines ranks as Σ_r mean_r·count_r / Σ_r count_r, the mean
over the whole global batch; a plain scalar counts as 1, which is right when every rank has the
same number of examples.  A rank with count 0 contributes nothing (its loss may be NaN).

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
import math
import os
import sys
import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["RankMismatchError", "RankFailedError", "init_from_env", "destroy", "is_initialized", "get_rank",
           "get_world_size", "is_main_process", "local_device", "shard_range", "shard_list",
           "broadcast_parameters", "is_dtensor", "local_shard", "fsdp_modules_of", "fingerprint", "ZOComm"]

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
    spec = getattr(t, "_spec", None)
    hit = _shard_cache.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] is spec and hit[2] == tuple(local.shape):
        return local, hit[3]
    from torch.distributed.tensor import Partial
    if any(isinstance(pl, Partial) for pl in t.placements):
        raise ValueError(f"parameter with placements {t.placements}: Partial (pending-reduction) tensors "
                         f"cannot be perturbed in place")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, off = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
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


def _fsdp_states():
    """(module, FSDP state) for every module fully_shard was applied to in this process."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                 # pragma: no cover - torch without FSDP2
        return []
    out, seen = [], set()
    for mod in list(_module_state_mapping.keys()):
        if isinstance(mod, FSDPModule):
            st = mod._get_fsdp_state()
            if id(st) not in seen:
                seen.add(id(st))
                out.append((mod, st))
    return out


def _param_groups_of(state) -> list:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:                  # torch <= 2.7: one group per state
        g = getattr(state, "_fsdp_param_group", None)
        groups = [] if g is None else [g]
    return list(groups)


def fsdp_modules_of(params: Iterable[torch.Tensor]) -> list:
    """The FSDP2 modules (one per fully_shard call) whose sharded parameters include any of `params`.

    `module.reshard()` on them makes the next forward all-gather from the shards again; FSDP2's
    root module otherwise keeps its all-gathered weights after a no-grad forward."""
    ids = {id(p) for p in params}
    out = []
    for mod, st in _fsdp_states():
        if any(id(fp.sharded_param) in ids for pg in _param_groups_of(st) for fp in pg.fsdp_params):
            out.append(mod)
    return out


def _check_not_unsharded(params: Sequence[torch.Tensor]) -> None:
    ids = {id(p) for p in params}
    for _, st in _fsdp_states():
        for pg in _param_groups_of(st):
            for fp in pg.fsdp_params:
                if id(getattr(fp, "_unsharded_param", None)) in ids:
                    raise ValueError(
                        "the optimizer was given FSDP2's all-gathered (unsharded) copy of a parameter: after a "
                        "forward pass FSDP2's root module keeps its parameters unsharded, so model.parameters() "
                        "returns those.  Build the optimizer right after fully_shard, or call model.reshard() "
                        "on every FSDP module first")


# --------------------------------------------------------------------------- fingerprints
def fingerprint(obj: Any) -> int:
    """A 63-bit hash of repr(obj) (blake2b): equal on every rank iff the reprs are equal."""
    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little") & _M63


_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def weight_checksum(tensors: Iterable[torch.Tensor]) -> int:
    """Order-independent exact checksum of tensors' bit patterns (integer sum, no rounding), 62 bits.

    Integer sums do not depend on reduction order, so equal weights give equal sums on any number
    of threads or GPUs; one read pass, one host sync."""
    totals: Dict[torch.device, torch.Tensor] = {}
    with torch.no_grad():
        for i, t in enumerate(tensors):
            if t.numel() == 0 or is_dtensor(t):
                continue
            bits = t.detach().reshape(-1).view(_INT_VIEWS[t.element_size()])
            s = bits.sum(dtype=torch.int64) * (2 * i + 1)   # weight by position: swapped tensors differ too
            if t.device in totals:
                totals[t.device] += s
            else:
                totals[t.device] = s
    total = 0
    for s in totals.values():           # one host sync per device
        total += int(s.item())
    return total & _M62


def _describe_mismatch(descs: List[dict]) -> str:
    keys = list(descs[0])
    lines = []
    for k in keys:
        vals = [d.get(k) for d in descs]
        if any(v != vals[0] for v in vals[1:]):
            shown = []
            for r, v in enumerate(vals):
                s = repr(v)
                shown.append(f"rank {r}: {s if len(s) <= 160 else s[:157] + '...'}")
            lines.append(f"  {k}: " + "; ".join(shown))
    return "\n".join(lines) or "  (the descriptions agree; a hash collision or a rank changed state mid-check)"


# ------------------------------------------------------------------------------ the comm
class LocalLoss:
    """One closure's result on this rank before the all-reduce: mean loss and its count."""

    __slots__ = ("value", "count")

    def __init__(self, value: float, count: float):
        self.value, self.count = value, count


def split_loss(out) -> Tuple[Any, Optional[float]]:
    """A closure's return value -> (loss, count or None).  Accepts loss or (loss, count)."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"a closure returns the loss or a pair (mean loss, count), got {len(out)} values")
        loss, count = out
        if isinstance(count, torch.Tensor):
            if count.numel() != 1:
                raise ValueError(f"the count must be a scalar, got shape {tuple(count.shape)}")
            count = count.item()
        if isinstance(count, bool) or not isinstance(count, (int, float)):
            raise TypeError(f"the count (second value a closure returns) must be a number, "
                            f"got {type(count).__name__}")
        count = float(count)
        if not math.isfinite(count) or count < 0:
            raise ValueError(f"the count must be finite and >= 0, got {count}")
        return loss, count
    return out, None


class ZOComm:
    """The collectives of one distributed ZO optimizer (made by the optimizer; not public API).

    Per step: `begin(desc)` (the first time: a MAX all-reduce of the fingerprint and weight
    checksum), then `reduce(losses)`: one SUM all-reduce of [Σ loss·count, Σ count] per forward
    pass, a failure flag and the 20-bit step fingerprint (h, h²)."""

    def __init__(self, group=None):
        dist = _dist()
        self.dist = dist
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.verified = False
        self.step_hash = 0
        self.failed: Optional[BaseException] = None
        self._device = None
        self._owners: Dict[int, list] = {}
        self._owner_refs: Dict[int, Any] = {}

    @property
    def device(self) -> torch.device:
        """CPU for gloo (and mixed 'cuda:nccl,cpu:gloo' groups), the current CUDA device for NCCL-only."""
        if self._device is None:
            backend = str(self.dist.get_backend(self.group)).lower()
            if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
                self._device = torch.device("cpu")
            else:
                self._device = torch.device("cuda", torch.cuda.current_device())
        return self._device

    # ---------------------------------------------------------------- the guard
    def begin(self, desc: dict, weights: Sequence[torch.Tensor]) -> None:
        """Start of a step: remember the step fingerprint; verify all ranks agree the first time."""
        self.failed = None
        h = fingerprint(desc)
        self.step_hash = h & ((1 << _STEP_BITS) - 1)
        if self.verified:
            return
        c = weight_checksum(weights)
        t = torch.tensor([h, -h, c, -c], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.group)
        hi_h, lo_h, hi_c, lo_c = (int(x) for x in t.tolist())
        if hi_h != -lo_h:
            descs = [None] * self.world
            self.dist.all_gather_object(descs, desc, group=self.group)
            raise RankMismatchError(
                f"the {self.world} ranks disagree on the ZO optimizer's state at its first step (rank {self.rank} "
                f"sees this); every rank must build the optimizer with the same seed, hyper-parameters and "
                f"parameter list and be at the same step, or their weights diverge silently:\n"
                + _describe_mismatch(descs))
        if hi_c != -lo_c:
            raise RankMismatchError(
                f"the replicated (non-sharded) weights differ between the {self.world} ranks at the first "
                f"distributed step (rank {self.rank} sees this): load the same checkpoint on every rank, seed "
                f"any random initialisation identically, or call "
                f"zo_kernels.distributed.broadcast_parameters(model) before training")
        self.verified = True

    # ---------------------------------------------------------------- the losses
    def reduce(self, vals: Sequence[LocalLoss], desc_fn) -> List[float]:
        """One SUM all-reduce for all of a step's forward passes -> the global mean of each."""
        buf = []
        for v in vals:
            n = 1.0 if v.count is None else v.count
            buf += [v.value * n if n else 0.0, n]
        h = self.step_hash
        buf += [1.0 if self.failed is not None else 0.0, float(h), float(h * h)]
        t = torch.tensor(buf, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        r = t.tolist()
        n_failed, sh, sh2 = r[-3], int(r[-2]), int(r[-1])
        if n_failed:
            if self.failed is not None:
                err, self.failed = self.failed, None
                raise err
            raise RankFailedError(f"{int(n_failed)} of {self.world} ranks raised in a closure this step; the step "
                                  f"was abandoned on every rank and the weights restored")
        if self.world * sh2 != sh * sh:     # exact integers: equal iff every rank sent the same h
            descs = [None] * self.world
            self.dist.all_gather_object(descs, desc_fn(), group=self.group)
            raise RankMismatchError(f"the {self.world} ranks drifted apart during training (rank {self.rank} "
                                    f"sees this):\n" + _describe_mismatch(descs))
        out = []
        for i in range(len(vals)):
            s, n = r[2 * i], r[2 * i + 1]
            out.append(s / n if n > 0 else float("nan"))
        return out

    # ---------------------------------------------------------------- FSDP2
    def local_views(self, storages: List[List[torch.Tensor]]):
        """DTensors -> (local tensors, offsets) per group; plain groups unchanged (offsets None).

        Also notes the FSDP2 modules owning the DTensors, for `refresh`."""
        out_ts, out_offs, owners = [], [], []
        for ts in storages:
            if not any(is_dtensor(t) for t in ts):
                out_ts.append(ts)
                out_offs.append(None)
                continue
            locs, offs = [], []
            for t in ts:
                loc, off = local_shard(t)
                locs.append(loc)
                offs.append(off)
                if is_dtensor(t):
                    owners.extend(self._owners_of(t))
            out_ts.append(locs)
            out_offs.append(offs)
        return out_ts, out_offs, owners

    def _owners_of(self, p) -> list:
        key = id(p)
        ref = self._owner_refs.get(key)
        if ref is None or ref() is not p:
            self._owners[key] = fsdp_modules_of([p])
            self._owner_refs[key] = weakref.ref(p)
        return self._owners[key]

    @staticmethod
    def refresh(owners: Sequence) -> None:
        """Reshard FSDP2 modules whose shards were just written, so the next forward re-gathers."""
        done = set()
        for m in owners:
            if id(m) not in done:
                done.add(id(m))
                m.reshard()


def make_comm(params: Sequence[torch.Tensor], distributed: Optional[bool], process_group) -> Optional[ZOComm]:
    """The optimizer's ZOComm, or None for a single-process optimizer.

    distributed=None: on when a parameter is a DTensor (sharded ranks must agree on every
    coefficient), else off.  True: on (torch.distributed must be initialised).  False: off
    (refused for DTensor parameters on more than one rank)."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None, got {type(distributed).__name__}")
    sharded = any(is_dtensor(p) for p in params)
    if process_group is not None and distributed is None:
        distributed = True
    if distributed is None:
        distributed = sharded
    if not distributed:
        if process_group is not None:
            raise ValueError("process_group was given with distributed=False")
        if sharded:
            raise ValueError("the parameters are DTensors (sharded, e.g. by FSDP2): the ranks must agree on "
                             "every ZO coefficient and the op must run on the local shards, so pass "
                             "distributed=True (or leave it None)")
        return None
    if not is_initialized():
        raise RuntimeError("distributed=True needs torch.distributed to be initialised: call "
                           "zo_kernels.distributed.init_from_env() (under torchrun) or "
                           "torch.distributed.init_process_group(...) before building the optimizer")
    if sharded:
        _check_not_unsharded(params)
    return ZOComm(process_group)
