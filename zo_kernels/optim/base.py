"""The optimizer core: parameter layout, the one noise path, closures, failure, state (docs/spec.md §5-§6).

Every change a ZO optimizer makes to the weights is a move between bookkept points
(`zo_kernels.optim.points`): the algorithm says *where the weights should be* and `_goto` works out
the fused call that gets them there; `_noise_axpy` is the only place that calls
`zo_kernels.noise_axpy_`.  Tensor ids: a parameter's id in the noise counter is its position in the
optimizer's flattened parameter list (group 0's params in order, then group 1's, ...), frozen ones
included, so freezing or unfreezing a tensor never changes the noise of the others.

How to add an optimizer (ZO-SGD-Sign, say: θ ← γθ − η·sign(l+ − l−)·z) -- one small file:

    class ZOSGDSign(ZOOptimizer):
        def __init__(self, params, lr, eps=1e-3, weight_decay=0.0, seed=0, **options):
            super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed, **options)

        def step(self, closure=None):
            if closure is None and self._closure_free_call():
                return None
            closure = self._require_closure(closure)
            w = self._start_step()                          # layout, rank check, snapshot
            k = step_key(self.seed, self._t)
            entry = list(w.at)                              # where step found the weights
            with self._failing_back(w, entry):              # an exception restores `entry`
                lp, lm = self._sync_losses(*self._two_point(w, entry, k, closure))
                if not (math.isfinite(lp) and math.isfinite(lm)):
                    return self._failed_step(w, entry, {"loss+": lp, "loss-": lm})
                s = math.copysign(1.0, lp - lm) if lp != lm else 0.0
                self._goto(w, [Point(self._decay(g["lr"], g["weight_decay"]), [(k, -g["lr"] * s)])
                               for g in self.param_groups], final=True)
                self._t += 1
                return (lp + lm) / 2.0

Options of the subclass that every rank must share go in `_options()`; `_exact_restore_allowed()`
says whether the weights may use exact restore (not while they stay perturbed between steps);
extra state goes through `_zo_state` / `_load_zo_state`.  The test for a new optimizer compares it
step by step with a float64 transcription in `zo_kernels.optim.naive`.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import distributed as _zdist
from .._comm import ZOComm, make_comm
from ..noise import M64, check_u64, mix_keys, step_key
from ..ops import ROUNDINGS, noise_axpy_
from ..restore import PLANE_BITS, PLANE_DTYPES, make_planes
from ..validate import check_tensor
from .closure import LocalLoss, split_loss
from .points import Call, Excursion, Point, Tracked, origin, plan_move, spsa_pair
from .sharded_state import check_state, local_state
from .state_check import all_or_nothing

NAN_POLICIES = ("raise", "skip")
RESTORES = ("auto", "exact", "fused")
_HALF = (torch.bfloat16, torch.float16)
_ROUNDING_TAG = 0x524F554E44  # "ROUND": domain separation of the per-call stochastic-rounding keys


class NonFiniteLossError(FloatingPointError):
    """A closure returned NaN/inf; the weights were restored to θ before the step."""


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
class LocalGroup:
    """A group's trainable tensors as a fused pass on them and their optimizer state sees them: the
    local shard of each DTensor (a plain tensor is its own shard) at its global element offset.
    Empty shards are left out (a rank may own no rows of a small tensor)."""

    params: List[torch.Tensor]      # the parameters: optimizer state is keyed and shaped by them
    shards: List[torch.Tensor]      # what the pass writes: p.to_local(), or p itself
    tids: List[int]
    offsets: Optional[List[int]]    # None when no tensor is sharded (the op's default: all 0)


# ------------------------------------------------------------------ validation
def _check_nonneg(value, name: str, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise ValueError(f"Invalid {name}: {value} (must be {'> 0' if strict else '>= 0'} and finite)")
    return value


def _flatten_params(params) -> list:
    if isinstance(params, torch.nn.Module):
        return list(params.parameters())
    params = list(params)
    if params and isinstance(params[0], dict):
        return [p for g in params for p in g["params"]]
    return params


def _hooked_step(step):
    """torch.optim's step-hook wrapper, except for the closure-free call the HF Trainer makes after
    ZOTrainer already stepped (`_closure_free_call`): that call is no step, so it fires no hooks."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if self.__dict__.get("_hooks_running"):     # a subclass's step calling super().step(): hooks fired once
            return step(self, *args, **kwargs)
        if all(a is None for a in args) and all(v is None for v in kwargs.values()) and self._closure_free_call():
            return None
        self._hooks_running = True
        try:
            return hooked(self, *args, **kwargs)
        finally:
            self._hooks_running = False

    wrapper.hooked = True       # torch.optim.Optimizer._patch_step_function: already wrapped
    return wrapper


# ----------------------------------------------------------------------- base
class ZOOptimizer(torch.optim.Optimizer):
    """Base class: layout, the one noise_axpy_ path, two-point evaluation, failure handling,
    trajectory log, NaN policy, HF hooks.  Subclasses implement `step` (see the module docstring).

    Options of every ZO optimizer (keyword arguments of MeZO, MeZOSVRG, ...):
        record: keep `opt.trajectory`, a list of every noise_axpy_ call on the weights (see `replay`).
        rounding: "nearest" | "stochastic" rounding of the update pass of bf16/fp16 weights (the
            perturbation passes always round to nearest).  backend: noise_axpy_ backend.
        restore: "auto" (exact for bf16/fp16 weights, fused for fp32), "exact" or "fused".  Exact
            restore undoes a perturbation by inverting its rounding (zo_kernels.restore) instead of
            subtracting μz again, so half-precision weights do not drift.
        plane_bits: residue-plane width for exact restore (0, 2, 4, 8 bits per element, allocated
            for the duration of a perturbation only); wider planes resolve more ambiguous elements.
        nan_policy: "raise" (default) or "skip" on a NaN/inf loss; either way θ is restored
            and the step counter is not advanced.
        snapshot: keep a copy of the trainable weights while a step runs, so that a failed step leaves
            them bit-identical for every dtype and restore mode, and a retried run is bit-identical to
            one that never failed (see "A failed step" below).  Cost: one more read+write pass per step
            (the copy) and the trainable weights' memory once more, kept between steps.
        distributed: data parallel over torch.distributed (see zo_kernels.distributed): each rank's
            closure returns the mean loss over its part of the batch, or (mean loss, count); one
            all-reduce of a few scalars per step makes every rank apply the same update.  None (the
            default) turns it on only for DTensor (FSDP2-sharded) parameters.  process_group: the
            ranks to reduce over (default: the world).

    A failed step -- the closure raises (any exception, KeyboardInterrupt too) or returns NaN/inf
    before the update -- does not advance the step counter and brings the weights back to where
    `step` found them.  With snapshot=True they are bit-identical.  Without it the way back is one
    more pass of the step's own kind (no extra memory), which is exact up to these limits:
      * exact restore (bf16/fp16 with restore="auto", or restore="exact"): bit-identical except
        elements where θ ± μz lies more than plane_bits binades above θ (above the grid just below
        θ, for a power of two), where its rounding cannot be inverted uniquely -- for plane_bits >= 2
        only where |θ| < μ|z|/(2^plane_bits − 1); those come back within one ulp of θ ± μz.
      * fused restore (fp32 with restore="auto", restore="fused", MeZO's lookahead): each element
        comes back as round(round(round(θ + μz) − 2μz) + μz), within 1.5 ulp of |θ| + 2μ|z| of θ.

    Distributed (zo_kernels.distributed): with `distributed=True` (or DTensor parameters) a step
    checks the ranks first (`_start_step`), its closures' results stay rank-local until
    `_sync_losses(...)` all-reduces them (once per step), and `_goto` runs on DTensors' local
    shards with their global element offsets.
    """

    _group_checks = {"lr": False, "eps": True, "weight_decay": False}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _hooked_step(cls.__dict__["step"])

    def __init__(self, params, defaults: dict, *, seed: int = 0, record: bool = False,
                 rounding: str = "nearest", backend: Optional[str] = None, nan_policy: str = "raise",
                 restore: str = "auto", plane_bits: int = 2, snapshot: bool = False,
                 distributed: Optional[bool] = None, process_group=None):
        self.seed = check_u64(seed, "seed")
        if not isinstance(snapshot, bool):
            raise TypeError(f"snapshot must be a bool, got {type(snapshot).__name__}")
        self.snapshot = snapshot
        self._snap: Optional[list] = None   # snapshot=True: (tensor, copy) pairs of what the step writes
        self._snap_bufs: Optional[List[torch.Tensor]] = None
        self._comm: Optional[ZOComm] = None
        if restore not in RESTORES:
            raise ValueError(f"restore must be one of {RESTORES}, got {restore!r}")
        if plane_bits not in (0,) + PLANE_BITS:
            raise ValueError(f"plane_bits must be 0 (no residue plane) or one of {PLANE_BITS}, got {plane_bits!r}")
        self.restore = restore
        self.plane_bits = plane_bits
        # Exact restore: the open excursion of each storage group, keyed by its storages and ids.
        self._excursions: Dict[tuple, Excursion] = {}
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or None, got {type(backend).__name__}")
        self.rounding = rounding
        self.backend = backend
        self.nan_policy = nan_policy
        self.record = bool(record)
        self.trajectory: Optional[list] = [] if self.record else None
        self.skipped_steps = 0
        self._t = 0                 # steps taken (the step counter of the noise keys)
        self._call_idx = 0          # noise_axpy_ calls issued within the current step
        self._in_step = False
        self._closure_free_steps = 0  # step() calls without a closure to ignore (skip_next_empty_step)
        super().__init__(params, defaults)
        self._comm = make_comm(_flatten_params(self.param_groups), distributed, process_group)

    # ------------------------------------------------------------ subclass hooks
    def _options(self) -> dict:
        """The subclass's own options that every rank must share (fingerprinted by the distributed guard)."""
        return {}

    def _exact_restore_allowed(self) -> bool:
        """Whether exact restore may apply: not when the weights stay perturbed between steps."""
        return True

    # -------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name, strict in self._group_checks.items():
            group[name] = _check_nonneg(group[name], name, strict)
        gi = len(self.param_groups) - 1
        for i, p in enumerate(group["params"]):
            name = f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
            check_tensor(p, name, written=False)      # dtype, sparse/strided, contiguous: as noise_axpy_ would
            if self.restore == "exact" and p.dtype not in PLANE_DTYPES:
                raise ValueError(f"{name} is {p.dtype}: restore='exact' inverts float32/bfloat16/float16 "
                                 f"rounding; use restore='auto' or 'fused' (float64 is computed in float64)")

    @property
    def step_count(self) -> int:
        """Steps taken so far; step t uses the noise key step_key(seed, t)."""
        return self._t

    def _mus(self) -> List[float]:
        return [g["eps"] for g in self.param_groups]

    def _layout(self, at: Optional[List[Point]] = None) -> Tracked:
        """The trainable tensors per group with their tensor ids, tied tensors once, at `at` (default:
        every group at its base point).

        Frozen tensors (requires_grad=False) are skipped but keep their id; a tensor whose
        storage an earlier trainable tensor already covers (tied weights) is skipped."""
        seen: Dict[object, torch.Tensor] = {}
        tensors, tids, tid = [], [], 0
        for g in self.param_groups:
            ts, ids = [], []
            for p in g["params"]:
                if p.requires_grad and p.numel() > 0:
                    # A DTensor's data_ptr() is 0: key it by identity (FSDP2 keeps tied weights as one).
                    ptr = ("dtensor", id(p)) if _zdist.is_dtensor(p) else p.data_ptr()
                    if ptr in seen:
                        if seen[ptr].shape != p.shape or seen[ptr].dtype != p.dtype:
                            raise ValueError("two trainable parameters overlap in memory with different "
                                             "shapes; tied weights must be the same tensor")
                    else:
                        seen[ptr] = p
                        ts.append(p)
                        ids.append(tid)
                tid += 1
            tensors.append(ts)
            tids.append(ids)
        if not any(tensors):
            ps = [p for g in self.param_groups for p in g["params"]]
            empty = sum(p.requires_grad and p.numel() == 0 for p in ps)
            raise ValueError(f"no trainable parameters: of {len(ps)}, {len(ps) - empty} have requires_grad=False "
                             f"and {empty} have no elements")
        return Tracked(tensors, tids, list(at) if at is not None else origin(len(tensors)))

    def _local_group(self, tensors: List[torch.Tensor], tids: List[int]) -> LocalGroup:
        """One group's tensors for a pass outside `_goto` (on dense optimizer state): local shards."""
        if not any(_zdist.is_dtensor(t) for t in tensors):
            return LocalGroup(list(tensors), list(tensors), list(tids), None)
        out = LocalGroup([], [], [], [])
        for p, tid in zip(tensors, tids):
            local, off = _zdist.local_shard(p)
            if local.numel() > 0:
                out.params.append(p)
                out.shards.append(local)
                out.tids.append(tid)
                out.offsets.append(off)
        return out

    def _refresh(self, tensors: List[torch.Tensor]) -> None:
        """After a pass outside `_goto` wrote shards: the FSDP2 modules owning them must re-gather."""
        if self._comm is not None:
            self._comm.refresh(self._comm.owners_of(tensors))

    # -------------------------------------------------------- the noise path
    def _noise_axpy(self, tensors: List[torch.Tensor], tids: List[int], call: Call, *, log: bool = True,
                    planes: Optional[list] = None, offsets: Optional[List[int]] = None) -> None:
        """The only call of zo_kernels.noise_axpy_ in the optimizers (and its trajectory record).

        offsets: global element offsets of shards (DTensor local tensors); empty shards are dropped
        here, after the call index (and so every later rounding key) advanced as on every rank."""
        keys = [k & M64 for k in call.keys]
        alphas = list(call.alphas)
        undo = None if call.undo is None else list(call.undo)
        rkey = mix_keys(_ROUNDING_TAG, step_key(self.seed, self._t), self._call_idx)
        self._call_idx += 1
        run_ts, run_ids, run_planes = tensors, tids, planes
        if offsets is not None:
            keep = [i for i, t in enumerate(tensors) if t.numel() > 0]
            if len(keep) < len(tensors):
                run_ts, run_ids = [tensors[i] for i in keep], [tids[i] for i in keep]
                offsets = [offsets[i] for i in keep]
                run_planes = None if planes is None else [planes[i] for i in keep]
        if run_ts:
            noise_axpy_(run_ts, keys, alphas, gamma=call.gamma, rounding=call.rounding, tensor_ids=run_ids,
                        offsets=offsets, rounding_key=rkey, backend=self.backend, undo=undo, planes=run_planes)
        if log and self.trajectory is not None:
            rec = {"step": self._t, "keys": list(keys), "alphas": [float(a) for a in alphas],
                   "gamma": float(call.gamma), "tensor_ids": list(tids), "rounding": call.rounding,
                   "rounding_key": rkey}
            if undo is not None:
                rec["undo"] = [float(u) for u in undo]
                rec["plane"] = None if planes is None else ("read" if any(undo) else "write")
                rec["plane_bits"] = self.plane_bits
            self.trajectory.append(rec)

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

    # ------------------------------------------------------------- closures
    def _closure_loss(self, closure: Callable):
        """Run a closure: its loss as a float, or (distributed) a rank-local value for `_sync_losses`.

        A closure returns the mean loss, or (mean loss, count) -- the count weighs this rank's mean
        in the all-reduce and is ignored by a single-process optimizer."""
        comm = self._comm
        if comm is not None and comm.failed is not None:
            return LocalLoss(float("nan"), 0.0)     # this rank already failed this step
        try:
            with torch.no_grad():
                out = closure()
            loss, count = split_loss(out)
            if isinstance(loss, torch.Tensor):
                if loss.numel() != 1:
                    raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}")
                value = float(loss.detach().double().item())
            else:
                value = float(loss)
        except Exception as e:
            if comm is None:
                raise
            comm.failed = e             # raised on every rank at _sync_losses, so no rank hangs
            return LocalLoss(float("nan"), 0.0)
        return value if comm is None else LocalLoss(value, count)

    def _two_point(self, w: Tracked, centers: List[Point], key: int, closure: Callable, *,
                   log: bool = True) -> tuple:
        """The two evaluations of an SPSA estimate: move w to center_g + μ_g·z(key), run the closure,
        move to center_g − μ_g·z(key), run it again.  Returns the two rank-local losses (l+, l−) for
        `_sync_losses`; the weights are left at center − μz (w.at says so)."""
        plus, minus = spsa_pair(centers, key, self._mus())
        self._goto(w, plus, log=log)
        lp = self._closure_loss(closure)
        self._goto(w, minus, log=log)
        lm = self._closure_loss(closure)
        return lp, lm

    def _sync_losses(self, *vals) -> List[float]:
        """The step's closure results as global floats: one all-reduce when distributed."""
        if self._comm is None:
            return list(vals)
        return self._comm.reduce(vals, lambda: self._rank_desc(self._layout()))

    def _rank_desc(self, layout: Tracked) -> dict:
        """What every rank must agree on (fingerprinted by the distributed guard)."""
        return {"optimizer": type(self).__name__, "seed": self.seed, "step": self._t,
                "rounding": self.rounding, "restore": self.restore, "plane_bits": self.plane_bits,
                "options": self._options(),
                "groups": [{k: g[k] for k in sorted(self._group_checks)} for g in self.param_groups],
                "layout": [(tid, tuple(p.shape), str(p.dtype), str(getattr(p, "placements", "")))
                           for ts, ids in zip(layout.tensors, layout.tids) for p, tid in zip(ts, ids)],
                "world": self._comm.world if self._comm is not None else 1}

    def _check_ranks(self, layout: Tracked) -> None:
        """Start of a distributed step: the first one verifies that all ranks agree (fingerprint
        and replicated-weight checksum, raising RankMismatchError on every rank if not)."""
        if self._comm is None:
            return
        weights = [p for g in self.param_groups for p in g["params"]]
        self._comm.begin(self._rank_desc(layout), weights)

    def _require_closure(self, closure, what: str = "closure"):
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step needs a {what}: a function that runs a forward pass "
                            f"on the current batch and returns the scalar loss (no backward)")
        if not callable(closure):
            raise TypeError(f"{what} must be callable, got {type(closure).__name__}")
        return closure

    def skip_next_empty_step(self) -> None:
        """Make the next `step()` called without a closure a no-op.  For trainers that step the
        optimizer themselves (ZOTrainer: the HF Trainer calls optimizer.step() after training_step)."""
        self._closure_free_steps += 1

    def _closure_free_call(self):
        """Consume one skip_next_empty_step(): True when this closure-free step() is to be ignored."""
        if self._closure_free_steps > 0:
            self._closure_free_steps -= 1
            return True
        return False

    # ------------------------------------------------------------- a step
    def _start_step(self, layout: Optional[Tracked] = None, extra: Sequence[torch.Tensor] = (),
                    first_call: int = 0) -> Tracked:
        """Begin a step on `layout` (default: the current layout at the base point): check the
        ranks, reset the call counter, and take the snapshot (snapshot=True) of the weights and of
        `extra` state the step writes."""
        w = self._layout() if layout is None else layout
        self._check_ranks(w)        # distributed: all ranks agree (first step), step fingerprint
        self._begin_step(first_call)
        self._take_snapshot(w.tensors, extra)
        return w

    @contextlib.contextmanager
    def _failing_back(self, w: Tracked, entry: List[Point], on_fail: Optional[Callable[[], None]] = None):
        """The body of a step: if it raises before the update (the step counter did not advance), the
        weights go back to `entry`, where step found them (`on_fail` first puts back any other state)."""
        t = self._t
        try:
            yield
        except BaseException:
            if self._t == t:
                self._restore_failed(w, entry, on_fail)
            raise
        finally:
            self._snap = None
            self._in_step = False

    def _failed_step(self, w: Tracked, entry: List[Point], losses: dict,
                     on_fail: Optional[Callable[[], None]] = None) -> float:
        """A non-finite loss: restore `entry`, then raise NonFiniteLossError or (nan_policy="skip")
        count the skip and return NaN."""
        self._restore_failed(w, entry, on_fail)
        desc = ", ".join(f"{k}={v}" for k, v in losses.items())
        bad = next(((t, p) for ts, ids in zip(w.tensors, w.tids) for p, t in zip(ts, ids)
                    if not bool(torch.isfinite(local_state(p)).all())), None)
        if bad is not None:     # skipping cannot help: an earlier update overflowed the weights' dtype
            raise NonFiniteLossError(f"{type(self).__name__} step {self._t}: non-finite loss ({desc}) because the "
                                     f"weights themselves hold inf/NaN (tensor id {bad[0]}, {bad[1].dtype}, shape "
                                     f"{tuple(bad[1].shape)}): an earlier update left the dtype's range; lower "
                                     f"the learning rate or train in float32")
        if self.nan_policy == "raise":
            raise NonFiniteLossError(f"{type(self).__name__} step {self._t}: non-finite loss ({desc}); the "
                                     f"weights were restored to their value before the step and the step "
                                     f"counter was not advanced (nan_policy='skip' skips such steps instead)")
        self.skipped_steps += 1
        return float("nan")

    def _take_snapshot(self, tensors: List[List[torch.Tensor]], extra: Sequence[torch.Tensor] = ()) -> None:
        """snapshot=True: copy the trainable weights (and `extra` state the step writes, e.g. SVRG's
        anchor buffers) before the step's first pass: one more read+write pass, their memory again."""
        if not self.snapshot:
            return
        local = self._comm.local_views(tensors)[0] if self._comm is not None else tensors
        targets = [x for ts in local for x in ts] + list(extra)
        # The copies are kept between steps: the peak memory is the same, and a fresh CPU allocation
        # costs page faults on every step (measured ~1.8x the time of a copy into a kept buffer).
        keep = self._snap_bufs
        if keep is None or len(keep) != len(targets) or any(
                b.shape != t.shape or b.dtype != t.dtype or b.device != t.device for b, t in zip(keep, targets)):
            keep = self._snap_bufs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in targets]
        with torch.no_grad():
            for b, t in zip(keep, targets):
                b.copy_(t)
        self._snap = list(zip(targets, keep))

    def _restore_failed(self, w: Tracked, entry: List[Point], on_fail: Optional[Callable[[], None]] = None) -> None:
        """A step failed before its update: bring the weights back to `entry`, where step found them.

        With snapshot=True the copy taken by `_take_snapshot` is written back: bit-identical for every
        dtype and restore mode.  Otherwise the restore is one more move of the step's own kind (fused:
        a third rounding; exact: the rounding is inverted), whose precision the class docstring states."""
        if on_fail is not None:
            on_fail()
        snap, self._snap = self._snap, None
        if snap is None:
            self._goto(w, entry)
            return
        with torch.no_grad():
            for t, copy in snap:
                t.copy_(copy)
        if self._comm is not None:
            self._comm.refresh(self._comm.local_views(w.tensors)[2])   # FSDP2: re-gather the restored shards
        self._excursions.clear()        # the weights are exactly `entry` again
        w.at = list(entry)

    def _begin_step(self, first_call: int = 0):
        self._call_idx = first_call
        self._excursions.clear()    # between steps the weights are exactly what they hold
        self._in_step = True

    @staticmethod
    def _decay(lr: float, weight_decay: float) -> float:
        """γ = 1 − ηλ (applied by noise_axpy_ in fp32: see README, "weight decay and fp32 γ")."""
        gamma = 1.0 - lr * weight_decay
        if gamma <= 0.0:
            raise ValueError(f"lr * weight_decay = {lr * weight_decay} must be < 1")
        return gamma

    # --------------------------------------------------- evaluation helpers
    @property
    def is_perturbed(self) -> bool:
        """True when the weights sit at a perturbed point between steps (MeZO lookahead)."""
        return False

    def settle(self) -> None:
        """Bring the weights to the current iterate θ_t (no-op unless they are perturbed)."""

    def eval(self) -> None:
        """Called by the HF Trainer before evaluation (the schedule-free protocol): settles."""
        self.settle()

    def train(self) -> None:
        """Called by the HF Trainer in each training step: nothing to do."""

    @contextlib.contextmanager
    def settled(self):
        """`with opt.settled(): evaluate(model)` -- the weights are θ_t inside (and stay so after)."""
        self.settle()
        yield self

    def watch(self, module: torch.nn.Module, action: str = "settle"):
        """Guard a module: a forward pass outside `step` while the weights are perturbed settles them
        first (action="settle"), warns and settles ("warn"), or raises ("raise").  Returns the hook handle."""
        if action not in ("settle", "warn", "raise"):
            raise ValueError(f"action must be 'settle', 'warn' or 'raise', got {action!r}")

        def hook(mod, args):
            if self._in_step or not self.is_perturbed:
                return None
            if action == "raise":
                raise RuntimeError(f"{type(self).__name__}: forward pass on perturbed weights outside step(); "
                                   f"call opt.settle() (or use `with opt.settled():`) before evaluating")
            if action == "warn":
                warnings.warn(f"{type(self).__name__}: forward pass on perturbed weights outside step(); "
                              f"settling them first", RuntimeWarning, stacklevel=2)
            self.settle()
            return None

        return module.register_forward_pre_hook(hook)

    # ------------------------------------------------------------ state
    def _zo_state(self) -> dict:
        return {"version": 1, "kind": type(self).__name__, "step": self._t, "seed": self.seed,
                "skipped_steps": self.skipped_steps, "rounding": self.rounding,
                "trajectory": None if self.trajectory is None else [dict(r) for r in self.trajectory]}

    def _load_zo_state(self, zo: dict) -> None:
        if zo.get("kind") != type(self).__name__:
            raise ValueError(f"state_dict was saved by {zo.get('kind')}, not {type(self).__name__}")
        self._t = int(zo["step"])
        self.seed = check_u64(int(zo["seed"]), "seed")
        self.skipped_steps = int(zo.get("skipped_steps", 0))
        self.rounding = zo.get("rounding", self.rounding)
        traj = zo.get("trajectory")
        if traj is not None:
            self.trajectory = [dict(r) for r in traj]
            self.record = True

    def _saved_state_by_param(self, state_dict: dict) -> list:
        """(parameter, saved state) pairs of a state_dict, each value checked against its parameter."""
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(h["params"]) for g, h in zip(groups, self.param_groups)):
            return []       # torch.optim's load raises its own error about the groups
        ids = dict(zip(itertools.chain.from_iterable(g["params"] for g in groups),
                       itertools.chain.from_iterable(g["params"] for g in self.param_groups)))
        out = []
        for idx, st in state_dict.get("state", {}).items():
            p = ids.get(idx)
            if p is None:
                continue
            for k, v in st.items():
                check_state(p, v, f"state_dict['state'][{idx}][{k!r}]")
            out.append((p, st))
        return out

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"] = self._zo_state()
        return sd

    @all_or_nothing     # checks class, groups and every state tensor first; a refused load changes nothing
    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load, except that tensor state keeps the dtype it was saved with.

        torch.optim casts floating state to its parameter's dtype (Adam's moments follow bf16
        weights); the ZO optimizers keep float32 state for bf16/fp16 weights, so the cast would
        round it (and the fused passes refuse non-float32 state).  State of DTensor (FSDP2-sharded)
        parameters must be DTensors sharded like them (see zo_kernels.optim.sharded_state);
        anything else is refused before anything is loaded."""
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError(f"not a {type(self).__name__} state_dict (no 'zo' entry)")
        saved = self._saved_state_by_param(state_dict)
        super().load_state_dict(state_dict)
        for p, st in saved:
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step":
                    self.state[p][k] = v.to(device=p.device)
        self._load_zo_state(zo)
        if self._comm is not None:
            self._comm.verified = False     # check the ranks again at the next step
