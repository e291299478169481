"""The collectives of a distributed ZO optimizer (private: the optimizers make it; the public side
is zo_kernels.distributed).

Per step: `begin(desc)` (the first time: a MAX all-reduce of the fingerprint and weight checksum),
then `reduce(losses)`: one SUM all-reduce of [Σ loss·count, Σ count] per forward pass, a failure
flag and the 20-bit step fingerprint (h, h²).
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence

import torch

from . import _fsdp
from .distributed import (
    _M62,
    _STEP_BITS,
    RankFailedError,
    RankMismatchError,
    _dist,
    fingerprint,
    fsdp_modules_of,
    is_dtensor,
    is_initialized,
    local_shard,
)

if TYPE_CHECKING:
    from .optim.closure import LocalLoss

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
class ZOComm:
    """The collectives of one distributed ZO optimizer (made by the optimizer).

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

    def owners_of(self, tensors: Sequence[torch.Tensor]) -> list:
        """The FSDP2 modules owning the DTensors among `tensors`, for `refresh`."""
        return [m for t in tensors if is_dtensor(t) for m in self._owners_of(t)]

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


def _check_not_unsharded(params: Sequence[torch.Tensor]) -> None:
    ids = {id(p) for p in params}
    for _, st in _fsdp.states():
        for pg in _fsdp.param_groups_of(st):
            for fp in pg.fsdp_params:
                if id(_fsdp.unsharded_param(fp)) in ids:
                    raise ValueError(
                        "the optimizer was given FSDP2's all-gathered (unsharded) copy of a parameter: after a "
                        "forward pass FSDP2's root module keeps its parameters unsharded, so model.parameters() "
                        "returns those.  Build the optimizer right after fully_shard, or call model.reshard() "
                        "on every FSDP module first")
