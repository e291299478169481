"""Shared step machinery of the ZO optimizers: parameter layout, the one noise path, bookkeeping.

Every change a ZO optimizer makes to the weights goes through `ZOOptimizer._noise_axpy`, the
only place that calls `zo_kernels.noise_axpy_`; the algorithms describe *where the weights
should be* and `_goto` works out the fused call that gets them there.

Bookkeeping (`Lin`): a weight storage holds, in exact arithmetic,

    x = a · base + Σ_k c[k] · z(k)

for a base point (θ_t for MeZO, the anchor θ̄ for MeZO-SVRG) and a few seeded noise keys k.
Moving from one such point to another is a single noise_axpy_ with
gamma = a'/a and alphas α_k = c'[k] − gamma · c[k].  Perturb, restore, update, the
lookahead perturbation, and the multi-key jump from θ to θ̄ ± μz in replay mode are all
this one move; weight decay (gamma ≠ 1) is carried exactly.

Tensor ids: a parameter's id in the noise counter is its position in the optimizer's
flattened parameter list (group 0's params in order, then group 1's, ...), frozen ones
included, so freezing or unfreezing a tensor never changes the noise of the others.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import distributed as _zdist
from ..noise import M64, mix_keys, step_key
from ..ops import ROUNDINGS, noise_axpy_
from ..restore import PLANE_BITS, make_planes

NAN_POLICIES = ("raise", "skip")
RESTORES = ("auto", "exact", "fused")
_HALF = (torch.bfloat16, torch.float16)
_ROUNDING_TAG = 0x524F554E44  # "ROUND": domain separation of the per-call stochastic-rounding keys


class NonFiniteLossError(FloatingPointError):
    """A closure returned NaN/inf; the weights were restored to θ before the step."""


# ----------------------------------------------------------------- bookkeeping
class Lin:
    """x = a·base + Σ c[k]·z(k), in exact arithmetic (Python floats).  Key order is kept:
    it is the order of the terms in the fused call, which fixes its rounding."""

    __slots__ = ("a", "c")

    def __init__(self, a: float = 1.0, c: Optional[Sequence[Tuple[int, float]]] = None):
        self.a = float(a)
        self.c: Dict[int, float] = {}
        for k, v in (c.items() if isinstance(c, dict) else (c or ())):
            self.c[int(k)] = self.c.get(int(k), 0.0) + float(v)

    def plus(self, terms: Sequence[Tuple[int, float]]) -> "Lin":
        out = Lin(self.a, self.c)
        for k, v in terms:
            out.c[k] = out.c.get(k, 0.0) + float(v)
        return out

    def scaled(self, gamma: float) -> "Lin":
        return Lin(self.a * gamma, [(k, v * gamma) for k, v in self.c.items()])

    def to_state(self) -> list:
        return [self.a, [[k, v] for k, v in self.c.items()]]

    @classmethod
    def from_state(cls, s) -> "Lin":
        return cls(s[0], [(int(k), float(v)) for k, v in s[1]])

    def __repr__(self):
        return f"Lin(a={self.a!r}, c={self.c!r})"


def _lin_eq(x: Lin, y: Lin) -> bool:
    keys = set(x.c) | set(y.c)
    return x.a == y.a and all(x.c.get(k, 0.0) == y.c.get(k, 0.0) for k in keys)


def move_args(cur: Lin, tgt: Lin) -> Tuple[float, List[Tuple[int, float]]]:
    """(gamma, [(key, alpha)]) of the one noise_axpy_ that takes a storage from `cur` to `tgt`."""
    gamma = tgt.a / cur.a
    pairs = []
    for k in list(cur.c) + [k for k in tgt.c if k not in cur.c]:
        alpha = tgt.c.get(k, 0.0) - gamma * cur.c.get(k, 0.0)
        if alpha != 0.0:
            pairs.append((k, alpha))
    return gamma, pairs


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


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed <= M64:
        raise ValueError(f"seed={seed} is outside [0, 2**64)")
    return seed


def _flatten_params(params) -> list:
    if isinstance(params, torch.nn.Module):
        return list(params.parameters())
    params = list(params)
    if params and isinstance(params[0], dict):
        return [p for g in params for p in g["params"]]
    return params


# ----------------------------------------------------------------------- base
class ZOOptimizer(torch.optim.Optimizer):
    """Base class: layout, the one noise_axpy_ path, trajectory log, NaN policy, HF hooks.

    Subclasses implement `step`; they move weights only with `_goto` (which calls
    `_noise_axpy`).  `_reduce_loss` is the hook a data-parallel wrapper overrides to
    all-reduce the scalar losses.

    Distributed (zo_kernels.distributed): with `distributed=True` (or DTensor parameters) a step
    calls `_check_ranks(layout)` first, its closures' results stay rank-local until
    `_sync_losses(...)` all-reduces them (once per step), and `_goto` runs on DTensors' local
    shards with their global element offsets.
    """

    _group_checks = {"lr": False, "eps": True, "weight_decay": False}

    def __init__(self, params, defaults: dict, *, seed: int = 0, record: bool = False,
                 rounding: str = "nearest", backend: Optional[str] = None, nan_policy: str = "raise",
                 restore: str = "auto", plane_bits: int = 2, snapshot: bool = False,
                 distributed: Optional[bool] = None, process_group=None):
        self.seed = check_seed(seed)
        if not isinstance(snapshot, bool):
            raise TypeError(f"snapshot must be a bool, got {type(snapshot).__name__}")
        self.snapshot = snapshot
        self._snap: Optional[list] = None   # snapshot=True: (tensor, copy) pairs of what the step writes
        self._snap_bufs: Optional[List[torch.Tensor]] = None
        self._comm: Optional[_zdist.ZOComm] = None
        if restore not in RESTORES:
            raise ValueError(f"restore must be one of {RESTORES}, got {restore!r}")
        if plane_bits not in (0,) + PLANE_BITS:
            raise ValueError(f"plane_bits must be 0 (no residue plane) or one of {PLANE_BITS}, got {plane_bits!r}")
        self.restore = restore
        self.plane_bits = plane_bits
        # Exact restore, per storage group: [materialised point M, open excursion E (key -> coeff) or None,
        # residue planes or None].  The weights hold round(M + Σ E·z) from one exact-form call.
        self._xs: Dict[tuple, list] = {}
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
        self._closure_free_steps = 0  # steps the HF Trainer may call without a closure (ZOTrainer)
        super().__init__(params, defaults)
        self._comm = _zdist.make_comm(_flatten_params(self.param_groups), distributed, process_group)

    # -------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name, strict in self._group_checks.items():
            group[name] = _check_nonneg(group[name], name, strict)
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"ZO optimizers perturb floating-point tensors; got a {p.dtype} parameter")
            if not p.is_contiguous():
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not contiguous; noise_axpy_ "
                                 f"needs contiguous tensors")

    @property
    def step_count(self) -> int:
        """Steps taken so far; step t uses the noise key step_key(seed, t)."""
        return self._t

    def _layout(self) -> List[List[Tuple[torch.Tensor, int]]]:
        """Per group: [(tensor, tensor id)] of the trainable tensors, tied tensors once.

        Frozen tensors (requires_grad=False) are skipped but keep their id; a tensor whose
        storage an earlier trainable tensor already covers (tied weights) is skipped."""
        seen: Dict[int, torch.Tensor] = {}
        out, tid = [], 0
        for g in self.param_groups:
            entries = []
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
                        entries.append((p, tid))
                tid += 1
            out.append(entries)
        if not any(out):
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        return out

    @staticmethod
    def _tids(layout) -> List[List[int]]:
        return [[tid for _, tid in entries] for entries in layout]

    # -------------------------------------------------------- the noise path
    def _noise_axpy(self, tensors: List[torch.Tensor], tids: List[int], keys: List[int],
                    alphas: List[float], gamma: float, *, log: bool = True, rounding: Optional[str] = None,
                    undo: Optional[List[float]] = None, planes: Optional[list] = None,
                    offsets: Optional[List[int]] = None) -> None:
        """The only call of zo_kernels.noise_axpy_ in the optimizers (and its trajectory record).

        offsets: global element offsets of shards (DTensor local tensors); empty shards are dropped
        here, after the call index (and so every later rounding key) advanced as on every rank."""
        keys = [k & M64 for k in keys]
        rounding = rounding or self.rounding
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
            noise_axpy_(run_ts, keys, alphas, gamma=gamma, rounding=rounding, tensor_ids=run_ids, offsets=offsets,
                        rounding_key=rkey, backend=self.backend, undo=undo, planes=run_planes)
        if log and self.trajectory is not None:
            rec = {"step": self._t, "keys": list(keys), "alphas": [float(a) for a in alphas],
                   "gamma": float(gamma), "tensor_ids": list(tids), "rounding": rounding, "rounding_key": rkey}
            if undo is not None:
                rec["undo"] = [float(u) for u in undo]
                rec["plane"] = None if planes is None else ("read" if any(undo) else "write")
                rec["plane_bits"] = self.plane_bits
            self.trajectory.append(rec)

    def _exact_active(self, tensors: List[torch.Tensor]) -> bool:
        """Exact restore applies to half-precision weights by default (restore="auto")."""
        if self.restore == "fused" or getattr(self, "lookahead", False):
            return False
        return self.restore == "exact" or any(t.dtype in _HALF for t in tensors)

    def _exact_move(self, ts, ids, cur: Lin, tgt: Lin, final: bool, offs: Optional[List[int]] = None):
        """Plan one group's move in exact-restore form: (signature, planes) or None when nothing moves.

        A non-final move with gamma = 1 is an excursion from the materialised point M (perturbation,
        or a jump to θ̄ ± μz): it rounds to nearest so the next move can invert it.  A final move
        (an update) or one with gamma != 1 materialises its target, rounding with self.rounding."""
        skey = tuple(t.data_ptr() for t in ts) + tuple(ids)     # ids: empty shards may share data_ptr 0
        st = self._xs.get(skey)
        if st is None or not _lin_eq(st[0].plus(list((st[1] or {}).items())), cur):
            st = [cur, None, None]          # the weights are exactly what the bookkeeping says
        m, exc, planes = st
        exc = exc or {}
        gamma, pairs = move_args(m, tgt)
        excursion = gamma == 1.0 and not final
        pd = dict(pairs)
        keys = list(exc) + [k for k in pd if k not in exc]
        if not keys and gamma == 1.0:
            return None
        if not self.plane_bits:
            planes = None
        elif exc:
            pass                            # read the planes written when this excursion began
        elif excursion and pd:
            planes = make_planes(ts, self.plane_bits, offs)
        else:
            planes = None
        new_exc = pd if excursion and pd else None
        self._xs[skey] = [m if new_exc else tgt, new_exc, planes if new_exc else None]
        sig = ("exact", gamma, tuple(keys), tuple(exc.get(k, 0.0) for k in keys), tuple(pd.get(k, 0.0) for k in keys),
               "nearest" if excursion else self.rounding, planes is not None)
        return sig, planes

    def _goto(self, storages: List[List[torch.Tensor]], tids: List[List[int]], cur: List[Optional[Lin]],
              tgt: List[Optional[Lin]], *, log: bool = True, final: bool = False) -> List[Optional[Lin]]:
        """Move each group's storage from cur[g] to tgt[g]; groups needing identical calls share one.

        `final` marks the update of a step: only it rounds with self.rounding (stochastic rounding
        of a perturbation would only add noise that the restore cannot remove).  Returns tgt."""
        offsets: List[Optional[List[int]]] = [None] * len(storages)
        owners: list = []
        if self._comm is not None:      # DTensors -> their local shards and global element offsets
            storages, offsets, owners = self._comm.local_views(storages)
        calls: Dict[tuple, Tuple[list, list, list, list]] = {}
        for g, (ts, ids, offs) in enumerate(zip(storages, tids, offsets)):
            if not ts or tgt[g] is None:
                continue
            planes = None
            if self._exact_active(ts):
                plan = self._exact_move(ts, ids, cur[g], tgt[g], final, offs)
                if plan is None:
                    continue
                sig, planes = plan
            else:
                gamma, pairs = move_args(cur[g], tgt[g])
                if gamma == 1.0 and not pairs:
                    continue
                sig = ("fused", gamma, tuple(pairs), self.rounding if final else "nearest")
            bucket = calls.setdefault(sig, ([], [], [], []))
            bucket[0].extend(ts)
            bucket[1].extend(ids)
            bucket[2].extend(planes or [])
            bucket[3].extend(offs if offs is not None else [0] * len(ts))
        sharded = any(o is not None for o in offsets)
        for sig, (ts, ids, planes, offs) in calls.items():
            offs = offs if sharded else None
            if sig[0] == "exact":
                _, gamma, keys, undo, alphas, rounding, _ = sig
                self._noise_axpy(ts, ids, list(keys), list(alphas), gamma, log=log, rounding=rounding,
                                 undo=list(undo), planes=planes or None, offsets=offs)
            else:
                _, gamma, pairs, rounding = sig
                self._noise_axpy(ts, ids, [k for k, _ in pairs], [a for _, a in pairs], gamma, log=log,
                                 rounding=rounding, offsets=offs)
        if calls and owners:
            self._comm.refresh(owners)  # FSDP2: the next forward must all-gather the new shards
        return [t if t is not None else c for c, t in zip(cur, tgt)]

    # ------------------------------------------------------------- closures
    def _reduce_loss(self, loss):
        """Hook: reduce a closure's scalar loss across workers (identity here)."""
        return loss

    def _eval(self, closure: Callable):
        """Run a closure: its loss as a float, or (distributed) a rank-local value for `_sync_losses`.

        A closure returns the mean loss, or (mean loss, count) -- the count weighs this rank's mean
        in the all-reduce and is ignored by a single-process optimizer."""
        comm = self._comm
        if comm is not None and comm.failed is not None:
            return _zdist.LocalLoss(float("nan"), 0.0)     # this rank already failed this step
        try:
            with torch.no_grad():
                out = closure()
            loss, count = _zdist.split_loss(out)
            loss = self._reduce_loss(loss)
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
            return _zdist.LocalLoss(float("nan"), 0.0)
        return value if comm is None else _zdist.LocalLoss(value, count)

    def _sync_losses(self, *vals) -> List[float]:
        """The step's closure results as global floats: one all-reduce when distributed."""
        if self._comm is None:
            return list(vals)
        return self._comm.reduce(vals, lambda: self._rank_desc(self._layout()))

    def _rank_desc(self, layout) -> dict:
        """What every rank must agree on (fingerprinted by the distributed guard)."""
        return {"optimizer": type(self).__name__, "seed": self.seed, "step": self._t,
                "rounding": self.rounding, "restore": self.restore, "plane_bits": self.plane_bits,
                "options": {k: getattr(self, k) for k in ("lookahead", "q", "anchor") if hasattr(self, k)},
                "groups": [{k: g[k] for k in sorted(self._group_checks)} for g in self.param_groups],
                "layout": [(tid, tuple(p.shape), str(p.dtype), str(getattr(p, "placements", "")))
                           for entries in layout for p, tid in entries],
                "world": self._comm.world if self._comm is not None else 1}

    def _check_ranks(self, layout) -> None:
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

    def _closure_free_call(self):
        """The HF Trainer calls optimizer.step() after training_step; ZOTrainer has already stepped."""
        if self._closure_free_steps > 0:
            self._closure_free_steps -= 1
            return True
        return False

    def _non_finite(self, losses: dict) -> float:
        desc = ", ".join(f"{k}={v}" for k, v in losses.items())
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

    def _restore_failed(self, tensors, tids, cur: List[Lin], entry: List[Lin]) -> List[Lin]:
        """A step failed before its update: bring the weights back to `entry`, where step found them.

        With snapshot=True the copy taken by `_take_snapshot` is written back: bit-identical for every
        dtype and restore mode.  Otherwise the restore is one more move of the step's own kind (fused:
        a third rounding; exact: the rounding is inverted), whose precision the MeZO docstring states."""
        snap, self._snap = self._snap, None
        if snap is None:
            return self._goto(tensors, tids, cur, entry)
        with torch.no_grad():
            for t, copy in snap:
                t.copy_(copy)
        if self._comm is not None:
            self._comm.refresh(self._comm.local_views(tensors)[2])   # FSDP2: re-gather the restored shards
        self._xs.clear()                # the weights are exactly `entry` again
        return list(entry)

    def _begin_step(self, first_call: int = 0):
        self._call_idx = first_call
        self._xs.clear()            # between steps the weights are exactly what they hold
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
        self.seed = check_seed(int(zo["seed"]))
        self.skipped_steps = int(zo.get("skipped_steps", 0))
        self.rounding = zo.get("rounding", self.rounding)
        traj = zo.get("trajectory")
        if traj is not None:
            self.trajectory = [dict(r) for r in traj]
            self.record = True

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"] = self._zo_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError(f"not a {type(self).__name__} state_dict (no 'zo' entry)")
        super().load_state_dict(state_dict)
        self._load_zo_state(zo)
        if self._comm is not None:
            self._comm.verified = False     # check the ranks again at the next step


def replay(params, log, *, backend: Optional[str] = None) -> None:
    """Re-issue a recorded trajectory (opt.trajectory) on `params`, in place.

    params: the optimizer's parameters in the same order (a list, the param groups, or an
    nn.Module whose .parameters() the optimizer was built from), holding the initial
    weights.  Every noise_axpy_ call that touched the weights is repeated with the same
    keys, coefficients, gamma, tensor ids and rounding key, so on the same backend the
    result is bit-identical to the recorded run.
    """
    flat = _flatten_params(params)
    planes: Dict[tuple, list] = {}  # exact-restore residue planes, by the tensor ids they cover
    for i, rec in enumerate(log):
        ids = [int(t) for t in rec["tensor_ids"]]
        if ids and max(ids) >= len(flat):
            raise ValueError(f"log entry {i} refers to tensor id {max(ids)} but only {len(flat)} params were given")
        ts = [flat[t] for t in ids]
        pl = None
        if rec.get("plane") == "write":
            pl = planes[tuple(ids)] = make_planes(ts, int(rec["plane_bits"]))
        elif rec.get("plane") == "read":
            if tuple(ids) not in planes:
                raise ValueError(f"log entry {i} reads residue planes that no earlier entry wrote")
            pl = planes[tuple(ids)]
        kw = dict(gamma=float(rec["gamma"]), rounding=rec.get("rounding", "nearest"), tensor_ids=ids,
                  rounding_key=int(rec["rounding_key"]), backend=backend, undo=rec.get("undo"), planes=pl)
        keys, alphas = [int(k) for k in rec["keys"]], [float(a) for a in rec["alphas"]]
        if rec.get("key_v") is not None:    # a low-rank pass (LOZO)
            from ..lowrank import lowrank_noise_axpy_
            lowrank_noise_axpy_(ts, keys, int(rec["key_v"]), alphas, rank=int(rec["rank"]), **kw)
        else:
            noise_axpy_(ts, keys, alphas, **kw)
