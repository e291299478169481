"""The one noise path of the ZO optimizers: a move between bookkept points (zo_kernels.optim.points)
becomes fused passes of the primitive (docs/spec.md §2-§4, §7).  `_goto` plans the move, picks the
fused or exact-restore form, batches groups that share a call, and `_noise_axpy` -- prepare, issue,
record -- is the only place that calls a noise op.  A subclass that needs another op (LOZO's low-rank
pass) overrides `_issue` alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..noise import M64
from ..ops import noise_axpy_
from ..restore import PLANE_DTYPES, make_planes
from ..rounding import step_rounding_key
from .noise_form import noise_kw
from .points import Call, Excursion, Point, Tracked, plan_move

_HALF = (torch.bfloat16, torch.float16)


class _Batch:
    """The groups that share one call: their tensors, ids, residue planes and shard offsets."""

    __slots__ = ("tensors", "tids", "planes", "offsets")

    def __init__(self):
        self.tensors, self.tids, self.planes, self.offsets = [], [], [], []

    def add(self, ts, ids, planes, offs) -> None:
        self.tensors.extend(ts)
        self.tids.extend(ids)
        self.planes.extend(planes or [])
        self.offsets.extend(offs if offs is not None else [0] * len(ts))



@dataclass
class Pass:
    """One fused pass on the weights as `_noise_axpy` prepared it (empty shards left out)."""

    tensors: List[torch.Tensor]
    tids: List[int]
    keys: List[int]                 # unsigned 64-bit
    alphas: List[float]
    undo: Optional[List[float]]     # the exact-restore form (docs/spec.md §4), or None
    gamma: float
    rounding: str
    rounding_key: int
    planes: Optional[list]
    offsets: Optional[List[int]]
    record_tids: List[int]          # every tensor's id, empty shards too: the record is the same on every rank


class NoisePathMixin:
    """ZOOptimizer's noise path (its state: seed, noise, rounding, backend, restore, plane_bits, trajectory,
    _call_idx, _excursions, _comm)."""

    def _noise_axpy(self, tensors: List[torch.Tensor], tids: List[int], call: Call, *, log: bool = True,
                    planes: Optional[list] = None, offsets: Optional[List[int]] = None) -> None:
        """The one path from a planned call to the ops: prepare the pass, issue it, record it.

        offsets: global element offsets of shards (DTensor local tensors).  A subclass whose passes
        are another op's (LOZO: the low-rank one) overrides `_issue` only."""
        p = self._prepare_pass(tensors, tids, call, planes, offsets)
        extra = self._issue(p)
        if log and self.trajectory is not None:
            self.trajectory.append(self._pass_record(p, extra))

    def _prepare_pass(self, tensors: List[torch.Tensor], tids: List[int], call: Call, planes: Optional[list],
                      offsets: Optional[List[int]]) -> Pass:
        """The pass's arguments: unsigned keys, this pass's rounding key, and empty shards dropped --
        after the call index (and so every later rounding key) advanced as on every rank."""
        rkey = step_rounding_key(self.seed, self._t, self._call_idx)
        self._call_idx += 1
        run_ts, run_ids, run_planes = tensors, tids, planes
        if offsets is not None:
            keep = [i for i, t in enumerate(tensors) if t.numel() > 0]
            if len(keep) < len(tensors):
                run_ts, run_ids = [tensors[i] for i in keep], [tids[i] for i in keep]
                offsets = [offsets[i] for i in keep]
                run_planes = None if planes is None else [planes[i] for i in keep]
        return Pass(run_ts, run_ids, [k & M64 for k in call.keys], list(call.alphas),
                    None if call.undo is None else list(call.undo), call.gamma, call.rounding, rkey, run_planes,
                    offsets, list(tids))

    def _issue(self, p: Pass) -> dict:
        """Run the pass: the only call of zo_kernels.noise_axpy_ on the weights.  Returns the op's
        arguments beyond the Pass's fields, for the trajectory record (here none)."""
        if p.tensors:
            noise_axpy_(p.tensors, p.keys, p.alphas, gamma=p.gamma, rounding=p.rounding, tensor_ids=p.tids,
                        offsets=p.offsets, rounding_key=p.rounding_key, backend=self.backend, undo=p.undo,
                        planes=p.planes, **noise_kw(self.noise))
        return {}

    def _pass_record(self, p: Pass, extra: dict) -> dict:
        """The trajectory entry of a pass (`replay` re-issues it)."""
        rec = {"step": self._t, "keys": list(p.keys), "alphas": [float(a) for a in p.alphas],
               "gamma": float(p.gamma), "tensor_ids": list(p.record_tids), "rounding": p.rounding,
               "rounding_key": p.rounding_key, **noise_kw(self.noise), **extra}
        if p.undo is not None:
            rec["undo"] = [float(u) for u in p.undo]
            rec["plane"] = None if p.planes is None else ("read" if any(p.undo) else "write")
            rec["plane_bits"] = self.plane_bits
        return rec

    def _exact_active(self, tensors: List[torch.Tensor]) -> bool:
        """Exact restore applies to half-precision weights by default (restore="auto")."""
        if self.restore == "fused" or not self._exact_restore_allowed():
            return False
        if any(t.dtype not in PLANE_DTYPES for t in tensors):
            return False        # float64 beside half precision in one group (restore="auto"): fused
        return self.restore == "exact" or any(t.dtype in _HALF for t in tensors)

    def _exact_call(self, ts, ids, cur: Point, tgt: Point, final: bool,
                    offs: Optional[List[int]] = None) -> Optional[Tuple[Call, Optional[list]]]:
        """One group's move in exact-restore form (docs/spec.md §4): the call and the residue planes it
        writes or reads, or None when nothing moves.

        A non-final move with gamma = 1 is an excursion from the materialised point (perturbation,
        or a jump to θ̄ ± μz): it rounds to nearest so the next move can invert it.  A final move
        (an update) or one with gamma != 1 materialises its target, rounding with self.rounding."""
        skey = tuple(t.data_ptr() for t in ts) + tuple(ids)     # ids: empty shards may share data_ptr 0
        exc = self._excursions.get(skey)
        if exc is None or not exc.point().same_as(cur):
            exc = Excursion(cur)            # the weights are exactly what the bookkeeping says
        undo = exc.open or {}
        move = plan_move(exc.base, tgt)
        excursion = move.gamma == 1.0 and not final
        new = dict(move.pairs)
        keys = list(undo) + [k for k in new if k not in undo]
        if not keys and move.gamma == 1.0:
            return None
        planes = exc.planes
        if not self.plane_bits:
            planes = None
        elif undo:
            pass                            # read the planes written when this excursion began
        elif excursion and new:
            planes = make_planes(ts, self.plane_bits, offs)
        else:
            planes = None
        opened = excursion and bool(new)
        self._excursions[skey] = Excursion(exc.base, new, planes) if opened else Excursion(tgt)
        call = Call(move.gamma, tuple(keys), tuple(new.get(k, 0.0) for k in keys),
                    "nearest" if excursion else self.rounding,
                    undo=tuple(undo.get(k, 0.0) for k in keys), with_planes=planes is not None)
        return call, planes

    def _goto(self, w: Tracked, tgt: List[Optional[Point]], *, log: bool = True, final: bool = False) -> None:
        """Move each group's storage from w.at[g] to tgt[g] (None: stays); groups needing identical
        calls share one.  Updates w.at.

        `final` marks the update of a step: only it rounds with self.rounding (stochastic rounding
        of a perturbation would only add noise that the restore cannot remove)."""
        storages = w.tensors
        offsets: List[Optional[List[int]]] = [None] * len(storages)
        owners: list = []
        if self._comm is not None:      # DTensors -> their local shards and global element offsets
            storages, offsets, owners = self._comm.local_views(storages)
        calls: Dict[Call, _Batch] = {}
        for g, (ts, ids, offs) in enumerate(zip(storages, w.tids, offsets)):
            if not ts or tgt[g] is None:
                continue
            planes = None
            if self._exact_active(ts):
                planned = self._exact_call(ts, ids, w.at[g], tgt[g], final, offs)
                if planned is None:
                    continue
                call, planes = planned
            else:
                move = plan_move(w.at[g], tgt[g])
                if move.is_identity:
                    continue
                call = Call(move.gamma, tuple(k for k, _ in move.pairs), tuple(a for _, a in move.pairs),
                            self.rounding if final else "nearest")
            calls.setdefault(call, _Batch()).add(ts, ids, planes, offs)
        sharded = any(o is not None for o in offsets)
        for call, batch in calls.items():
            self._noise_axpy(batch.tensors, batch.tids, call, log=log, planes=batch.planes or None,
                             offsets=batch.offsets if sharded else None)
        if calls and owners:
            self._comm.refresh(owners)  # FSDP2: the next forward must all-gather the new shards
        w.at = [t if t is not None else c for c, t in zip(w.at, tgt)]
