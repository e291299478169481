"""The optimizer core: options, parameter layout, closures and the frame of a step (docs/spec.md §5-§6).
`ZOOptimizer` is assembled from one module per concern: the noise path (noise_path.py), a failed
step's way back (failure.py), settling a perturbed lookahead (settling.py), state_dict (state.py).

Every change a ZO optimizer makes to the weights is a move between bookkept points
(`zo_kernels.optim.points`): the algorithm says *where the weights should be* and `_goto` works out
the fused call that gets them there; `_noise_axpy` is the one path from such a call to the ops
(it prepares the pass, `_issue`s it -- noise_axpy_, or LOZO's low-rank op -- and records it).
Tensor ids: a parameter's id in the noise counter is its position in the optimizer's flattened
parameter list (group 0's params in order, then group 1's, ...), frozen ones included, so freezing
or unfreezing a tensor never changes the noise of the others.

How to add an optimizer -- one small file.  A method that is a two-point SPSA estimate followed by
an update subclasses `SPSAOptimizer` (zo_kernels.optim.spsa), whose `step` does the rest (q
directions, the evaluations, failure and NaN handling, the distributed all-reduce, the step
counter), and overrides one hook.  ZO-SGD-Sign (θ ← γθ − η·(1/q)Σ_j sign(d_j)·z_j,
zo_kernels/optim/sign.py) is the whole of it:

    class ZOSGDSign(SPSAOptimizer):
        def __init__(self, params, lr, eps=1e-3, weight_decay=0.0, seed=0, *, n_directions=1, **core):
            super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                             n_directions=n_directions, **core)

        def _coefficients(self, ds, group):         # c_j of the update θ ← γθ − η·Σ_j c_j z_j
            q = len(ds)
            return [((d > 0) - (d < 0)) / q for d in ds]

The hooks (d_j = (l+_j − l−_j)/2 are the step's finite differences, keys[j] its directions' keys):
    _coefficients(ds, group)       the c_j above (default d_j/(q·μ): ZO-SGD, which is MeZO)
    _update(w, keys, ds, closure)  the whole update, when it is not γθ − η·Σ c_j z_j: move the weights
                                   with self._goto(w, [Point(γ, [(key, coefficient), ...]) per group],
                                   final=True) (momentum.py; zo_adam.py runs a fused noise_adam_ pass)
    _before_perturb(closure)       evaluations at θ before the first perturbation (cons.py)
    _snapshot_extra()              dense state the step writes before a failure can occur (snapshot=True)

A method whose step is not of that shape (MeZO's lookahead, MeZO-SVRG's anchor, LOZO's low-rank
passes) subclasses ZOOptimizer and writes `step` from the same parts: `_start_step`,
`_failing_back`, `_two_point`, `_sync_losses`, `_failed_step`, `_goto` (see spsa.py's `step`).
Options of the subclass that every rank must share go in `_options()`; `_exact_restore_allowed()`
says whether the weights may use exact restore (not while they stay perturbed between steps);
extra state goes through `_zo_state` / `_load_zo_state`.  The test for a new optimizer compares it
step by step with a float64 transcription in `zo_kernels.optim.naive`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import distributed as _zdist
from .._comm import ZOComm, make_comm
from ..noise import check_u64
from ..restore import PLANE_BITS, PLANE_DTYPES
from ..rounding import ROUNDINGS
from ..validate import check_tensor
from .closure import LocalLoss, split_loss
from .failure import FailedStepMixin, NonFiniteLossError  # noqa: F401  (re-exported)
from .noise_form import check_noise_form
from .noise_path import NoisePathMixin
from .points import Excursion, Point, Tracked, origin, spsa_pair
from .settling import SettleMixin
from .state import StateMixin

NAN_POLICIES = ("raise", "skip")
RESTORES = ("auto", "exact", "fused")
_HALF = (torch.bfloat16, torch.float16)


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
class ZOOptimizer(NoisePathMixin, FailedStepMixin, SettleMixin, StateMixin, torch.optim.Optimizer):
    """Base class: layout, the one noise_axpy_ path, two-point evaluation, failure handling,
    trajectory log, NaN policy, HF hooks.  Subclasses implement `step`, or subclass SPSAOptimizer and
    override its hooks (see the module docstring).

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
        noise: the form of the directions -- "gaussian" (z ~ N(0, I), zo-noise v1, the default) or
            "rademacher" (signs ±1, docs/spec.md §9; FZOO's default).  Every pass of the optimizer
            uses it, the trajectory records it (replay uses the same form), and a state_dict saved
            with one form does not load into an optimizer with the other.
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
                 distributed: Optional[bool] = None, process_group=None, noise: str = "gaussian"):
        self.seed = check_u64(seed, "seed")
        self.noise = check_noise_form(noise)
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
        self.dd_clip: Optional[float] = None     # set_dd_clip
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
        if self.dd_clip is not None:
            lp, lm = clip_pair(lp, lm, self.dd_clip * self._mus()[0])
        return lp, lm

    def set_dd_clip(self, c: Optional[float]) -> None:
        """QZO's directional-derivative clipping (docs/quantized.md): every two-point estimate's
        (l+ − l−)/(2μ) is clipped to [−c, c] (the pair moved symmetrically about its mean, so the step's
        reported loss is unchanged); None turns it off.  One μ for all groups and one process: the
        clip acts on the pair before a distributed all-reduce would combine the ranks' pairs."""
        if c is not None:
            if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
                raise ValueError(f"the directional-derivative clip must be a finite number > 0, got {c!r}")
            if len(set(self._mus())) != 1:
                raise ValueError("directional-derivative clipping needs one eps for every parameter group")
            if self._comm is not None:
                raise ValueError("directional-derivative clipping runs in one process (not distributed)")
        self.dd_clip = None if c is None else float(c)

    def _sync_losses(self, *vals) -> List[float]:
        """The step's closure results as global floats: one all-reduce when distributed."""
        if self._comm is None:
            return list(vals)
        return self._comm.reduce(vals, lambda: self._rank_desc(self._layout()))

    def _rank_desc(self, layout: Tracked) -> dict:
        """What every rank must agree on (fingerprinted by the distributed guard)."""
        return {"optimizer": type(self).__name__, "seed": self.seed, "step": self._t,
                "rounding": self.rounding, "noise": self.noise, "restore": self.restore, "plane_bits": self.plane_bits,
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


def clip_pair(lp: float, lm: float, half_width: float) -> tuple:
    """(l+, l−) with (l+ − l−)/2 clipped to [−half_width, half_width] about their mean; a pair inside
    is returned as it is (bit for bit)."""
    half = (lp - lm) / 2.0
    if abs(half) <= half_width or not math.isfinite(half):
        return lp, lm
    mid, h = (lp + lm) / 2.0, math.copysign(half_width, half)
    return mid + h, mid - h

