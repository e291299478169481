"""MeZO-SVRG (Gautam et al., ICML 2024, Algorithm 1) on the fused primitive.

Per group (μ = eps, η1 = lr_full, η2 = lr, λ = weight_decay, γ_i = 1 − η_i λ), step t, z_t = z(step_key(seed, t)):

  t % q == 0, full step (full_closure: the full batch or a large batch):
      c_a = SPSA of full_closure at θ with z_a = z_t      g = c_a z_a, kept as (c_a, key_a)
      θ̄ ← θ;   θ ← γ1 θ − η1 c_a z_a
  otherwise, minibatch step (closure), the SAME z_t at θ and at θ̄:
      c1 = SPSA of closure at θ with z_t;  c2 = SPSA of closure at θ̄ with z_t
      θ ← γ2 θ − η2 ((c1 − c2) z_t + c_a z_a)          one pass, two keys

anchor="dense": θ̄ is one weight-sized buffer per tensor; the closure is evaluated at θ̄ ± μz
by swapping the parameters' storages with it (`p.data = buffer`, O(1)), so it runs unchanged.
The buffer is left at θ̄ − μz_t after a step and moved straight to θ̄ + μz_{t+1} by the next one.

anchor="replay": no buffer.  θ = A·θ̄ + Σ_k c_k z_k exactly (every update since the anchor is
seeded scalars times z, and weight decay only scales), so one multi-key pass moves the weights
to θ̄ ± μz_t and one moves them back: the keys are z_a plus one per minibatch step since the anchor.

Passes per step: full 3 (+ a copy in dense mode), minibatch 5 (both modes).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from .. import distributed as _zdist
from ..noise import step_key
from .base import Lin, ZOOptimizer

ANCHORS = ("dense", "replay")


class MeZOSVRG(ZOOptimizer):
    """MeZO-SVRG: `loss = opt.step(closure, full_closure=None)`.

    On steps with t % q == 0 (`opt.is_full_step`), `full_closure()` must be given: it returns the
    loss over the full training set or a large batch (Remark 3.3), and `closure` is not called.
    Other steps use `closure()`, the loss on the current minibatch.

    Args:
        params: parameters or groups (groups may set lr, lr_full, eps, weight_decay).
        lr: η2, the minibatch-step rate.  lr_full: η1, the full-step rate.
        eps: μ.  q: a full step every q steps (q=1: every step is a full step).
        seed: base seed, int in [0, 2**64).  anchor: "dense" or "replay" (see the module doc).
        weight_decay: λ, applied as θ ← θ − η(ĝ + λθ) on both kinds of step.
        record, rounding, backend, nan_policy, restore, plane_bits: as for MeZO.
        snapshot: as for MeZO; with anchor="dense" the copy covers the anchor buffers too (the weights'
            memory twice more), so a retried step rounds exactly as one that never failed.  Without
            it a failed step restores by the step's own passes: exact restore as for MeZO; the fused
            passes (fp32) within their roundings, a few ulp of the largest intermediate |θ|, |θ̄ ± μz|.
        distributed, process_group: as for MeZO; full_closure too returns this rank's mean (or
            (mean, count)) over its part of the full / large batch.  DTensor (sharded) parameters
            need anchor="replay".

    Returns from step: (l+ + l−)/2 at θ_t -- of full_closure on full steps, of closure otherwise.
    """

    _group_checks = {"lr": False, "lr_full": False, "eps": True, "weight_decay": False}

    def __init__(self, params, lr: float, lr_full: float, eps: float = 1e-3, q: int = 2, seed: int = 0,
                 anchor: str = "dense", weight_decay: float = 0.0, *, record: bool = False,
                 rounding: str = "nearest", backend: Optional[str] = None, nan_policy: str = "raise",
                 restore: str = "auto", plane_bits: int = 2, snapshot: bool = False,
                 distributed: Optional[bool] = None, process_group=None):
        if isinstance(q, bool) or not isinstance(q, int):
            raise TypeError(f"q must be an int >= 1, got {type(q).__name__}")
        if q < 1:
            raise ValueError(f"Invalid q: {q} (must be >= 1)")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        self.q = q
        self.anchor = anchor
        # Anchor: key_a, per-group c_a, the tids it covers; replay: θ_t as a Lin over θ̄ per group;
        # dense: where each anchor buffer is (Lin over θ̄).
        self._anchor = None
        self._theta: Optional[List[Lin]] = None
        self._buf_at: Optional[List[Lin]] = None
        super().__init__(params, dict(lr=lr, lr_full=lr_full, eps=eps, weight_decay=weight_decay), seed=seed,
                         record=record, rounding=rounding, backend=backend, nan_policy=nan_policy,
                         restore=restore, plane_bits=plane_bits, snapshot=snapshot, distributed=distributed,
                         process_group=process_group)
        if anchor == "dense" and any(_zdist.is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise ValueError("MeZOSVRG anchor='dense' swaps parameter storages, which sharded (DTensor / FSDP2) "
                             "parameters do not allow; use anchor='replay' (no weight-sized buffer at all)")

    @property
    def is_full_step(self) -> bool:
        """True when the next step is a full step (needs full_closure): step_count % q == 0."""
        return self._t % self.q == 0

    # ---------------------------------------------------------- dense buffers
    def _buffers(self, layout, create: bool) -> List[List[torch.Tensor]]:
        out = []
        for entries in layout:
            bufs = []
            for p, _ in entries:
                st = self.state[p]
                if "anchor" not in st:
                    if not create:
                        raise RuntimeError("MeZOSVRG: a trainable tensor has no anchor buffer; the set of "
                                           "trainable tensors changed since the last full step")
                    if _zdist.is_dtensor(p):
                        raise ValueError("MeZOSVRG anchor='dense' swaps parameter storages, which sharded "
                                         "(DTensor / FSDP2) parameters do not allow; use anchor='replay' "
                                         "(no weight-sized buffer at all)")
                    st["anchor"] = torch.empty_like(p, memory_format=torch.contiguous_format)
                bufs.append(st["anchor"])
            out.append(bufs)
        return out

    def _aliases(self, layout):
        """For each trainable tensor: every parameter object sharing its storage (tied weights)."""
        by_ptr = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p.numel() > 0:
                    by_ptr.setdefault(p.data_ptr(), []).append(p)
        return [[by_ptr[p.data_ptr()] for p, _ in entries] for entries in layout]

    @staticmethod
    def _swap(aliases, new_data):
        """Point every parameter (and its tied aliases) at new_data; return the previous tensors."""
        old = []
        for als, nd in zip(aliases, new_data):
            old.append(als[0].data)
            for p in als:
                p.data = nd
        return old

    # ----------------------------------------------------------------- step
    def step(self, closure: Optional[Callable] = None, full_closure: Optional[Callable] = None) -> float:
        if closure is None and full_closure is None and self._closure_free_call():
            return None
        layout = self._layout()
        tids = self._tids(layout)
        if self.is_full_step:
            if full_closure is None:
                raise ValueError(f"MeZOSVRG step {self._t} is a full-batch step (step % q == 0, q={self.q}): "
                                 f"pass full_closure=..., a closure returning the loss on the full training "
                                 f"set or a large batch; check opt.is_full_step before building the batch")
            full_closure = self._require_closure(full_closure, "full_closure")
            return self._full_step(layout, tids, full_closure)
        closure = self._require_closure(closure)
        if self._anchor is None:
            raise RuntimeError("MeZOSVRG: no anchor (the last full step failed); the next step must be a full step")
        if self._anchor["tids"] != tids:
            raise RuntimeError("MeZOSVRG: the set of trainable tensors changed since the last full step; "
                               "change it only right before a full step (opt.is_full_step)")
        return self._minibatch_step(layout, tids, closure)

    def _full_step(self, layout, tids, full_closure) -> float:
        groups = self.param_groups
        mus = [g["eps"] for g in groups]
        tensors = [[p for p, _ in e] for e in layout]
        t = self._t
        a = step_key(self.seed, t)
        self._check_ranks(layout)   # distributed: all ranks agree (first step), step fingerprint
        self._begin_step()
        self._take_snapshot(tensors)
        # The weights hold θ_t and θ_t becomes the new anchor: θ_t is the base point from here on.
        theta = [Lin() for _ in groups]
        cur = theta
        try:
            if self.anchor == "dense":
                bufs = self._buffers(layout, create=True)
                with torch.no_grad():
                    for bs, ts in zip(bufs, tensors):
                        for b, p in zip(bs, ts):
                            b.copy_(p)
                self._anchor = None             # the buffer now holds θ_t; valid again after the update
                self._buf_at = [Lin() for _ in groups]
            cur = self._goto(tensors, tids, cur, [th.plus([(a, mu)]) for th, mu in zip(theta, mus)])
            lp = self._eval(full_closure)
            cur = self._goto(tensors, tids, cur, [th.plus([(a, -mu)]) for th, mu in zip(theta, mus)])
            lm = self._eval(full_closure)
            lp, lm = self._sync_losses(lp, lm)       # distributed: one all-reduce, global means
            if not (math.isfinite(lp) and math.isfinite(lm)):
                cur = self._restore_failed(tensors, tids, cur, theta)
                return self._non_finite({"full loss+": lp, "full loss-": lm})
            d = (lp - lm) / 2.0
            cs = [d / mu for mu in mus]
            # The new anchor θ̄ = θ_t: rebase the bookkeeping on it.
            rel = [Lin(1.0, [(a, -mu)]) for mu in mus]
            new_theta = [Lin(self._decay(g["lr_full"], g["weight_decay"]), [(a, -g["lr_full"] * c)])
                         for g, c in zip(groups, cs)]
            self._goto(tensors, tids, rel, new_theta, final=True)
            self._theta = new_theta if self.anchor == "replay" else None
            self._anchor = {"key": a, "c": cs, "tids": tids, "step": t}
            self._t += 1
            return (lp + lm) / 2.0
        except BaseException:
            if self._t == t:    # failed before the update: the weights go back to θ_t, where step found them
                self._restore_failed(tensors, tids, cur, theta)
            raise
        finally:
            self._snap = None
            self._in_step = False

    def _minibatch_step(self, layout, tids, closure) -> float:
        groups = self.param_groups
        mus = [g["eps"] for g in groups]
        tensors = [[p for p, _ in e] for e in layout]
        t = self._t
        k = step_key(self.seed, t)
        a, cas = self._anchor["key"], self._anchor["c"]
        self._check_ranks(layout)   # distributed: all ranks agree (first step), step fingerprint
        self._begin_step()
        replay = self.anchor == "replay"
        theta = self._theta if replay else [Lin() for _ in groups]
        cur = theta
        swapped = None
        buf_at = self._buf_at
        # snapshot=True covers the anchor buffers too, so a retried step rounds exactly as an unfailed one
        self._take_snapshot(tensors, [] if replay else [b for bs in self._buffers(layout, create=False) for b in bs])
        try:
            cur = self._goto(tensors, tids, cur, [th.plus([(k, mu)]) for th, mu in zip(theta, mus)])
            l1p = self._eval(closure)
            cur = self._goto(tensors, tids, cur, [th.plus([(k, -mu)]) for th, mu in zip(theta, mus)])
            l1m = self._eval(closure)
            at_bar_p = [Lin(1.0, [(k, mu)]) for mu in mus]
            at_bar_m = [Lin(1.0, [(k, -mu)]) for mu in mus]
            if replay:
                cur = self._goto(tensors, tids, cur, at_bar_p)
                l2p = self._eval(closure)
                cur = self._goto(tensors, tids, cur, at_bar_m)
                l2m = self._eval(closure)
            else:
                bufs = self._buffers(layout, create=False)
                aliases = self._aliases(layout)
                flat_al = [x for e in aliases for x in e]
                swapped = self._swap(flat_al, [b for bs in bufs for b in bs])
                try:
                    self._buf_at = self._goto(bufs, tids, self._buf_at, at_bar_p, log=False)
                    l2p = self._eval(closure)
                    self._buf_at = self._goto(bufs, tids, self._buf_at, at_bar_m, log=False)
                    l2m = self._eval(closure)
                    if self._exact_active([b for bs in bufs for b in bs]):
                        # Exact restore cannot carry an excursion across steps: bring θ̄ back now
                        # (one more pass) instead of moving it straight to θ̄ + μz_{t+1} next step.
                        self._buf_at = self._goto(bufs, tids, self._buf_at, [Lin() for _ in groups], log=False)
                finally:
                    self._swap(flat_al, swapped)
                    swapped = None
            l1p, l1m, l2p, l2m = self._sync_losses(l1p, l1m, l2p, l2m)   # distributed: one all-reduce
            losses = {"loss+": l1p, "loss-": l1m, "anchor loss+": l2p, "anchor loss-": l2m}
            if not all(math.isfinite(v) for v in losses.values()):
                if self._snap is not None:
                    self._buf_at = buf_at
                cur = self._restore_failed(tensors, tids, cur, theta)
                return self._non_finite(losses)
            d1, d2 = (l1p - l1m) / 2.0, (l2p - l2m) / 2.0
            new_theta = []
            for g, mu, th, ca in zip(groups, mus, theta, cas):
                lr, wd = g["lr"], g["weight_decay"]
                new_theta.append(th.scaled(self._decay(lr, wd)).plus([(k, -lr * ((d1 - d2) / mu)), (a, -lr * ca)]))
            if replay:
                self._goto(tensors, tids, cur, new_theta, final=True)
                self._theta = new_theta
            else:
                # Dense bookkeeping is relative to θ_t: rebase on θ_{t+1} right away.
                self._goto(tensors, tids, cur, new_theta, final=True)
            self._t += 1
            return (l1p + l1m) / 2.0
        except BaseException:
            if self._t == t:    # failed before the update: the weights go back to θ_t, where step found them
                if self._snap is not None:
                    self._buf_at = buf_at
                self._restore_failed(tensors, tids, cur, theta)
            raise
        finally:
            self._snap = None
            self._in_step = False

    # ---------------------------------------------------------------- state
    def _zo_state(self) -> dict:
        zo = super()._zo_state()
        zo.update(q=self.q, anchor_mode=self.anchor,
                  anchor=None if self._anchor is None else dict(self._anchor),
                  theta=None if self._theta is None else [x.to_state() for x in self._theta],
                  buf_at=None if self._buf_at is None else [x.to_state() for x in self._buf_at])
        return zo

    def _load_zo_state(self, zo: dict) -> None:
        if zo.get("anchor_mode") != self.anchor:
            raise ValueError(f"state_dict was saved with anchor={zo.get('anchor_mode')!r}, this optimizer "
                             f"has anchor={self.anchor!r}")
        super()._load_zo_state(zo)
        self.q = int(zo["q"])
        anc = zo.get("anchor")
        self._anchor = None if anc is None else {"key": int(anc["key"]), "c": [float(c) for c in anc["c"]],
                                                 "tids": [list(map(int, x)) for x in anc["tids"]],
                                                 "step": int(anc["step"])}
        self._theta = None if zo.get("theta") is None else [Lin.from_state(s) for s in zo["theta"]]
        self._buf_at = None if zo.get("buf_at") is None else [Lin.from_state(s) for s in zo["buf_at"]]
