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
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch

from .. import distributed as _zdist
from ..noise import step_key
from .base import ZOOptimizer
from .points import Point, Tracked, origin

ANCHORS = ("dense", "replay")


@dataclass
class Anchor:
    """The last full step: z_a's key, each group's c_a (g = c_a·z_a: two numbers instead of a
    weight-sized tensor), the tensor ids it covers, and its step."""

    key: int
    c: List[float]
    tids: List[List[int]]
    step: int


def full_update(groups, d: float, key: int, decay) -> List[Point]:
    """θ_{t+1} of each group as a point over the new anchor θ̄ = θ_t: γ1·θ̄ − η1·c_a·z_a, c_a = d/μ."""
    return [Point(decay(g["lr_full"], g["weight_decay"]), [(key, -g["lr_full"] * (d / g["eps"]))]) for g in groups]


def minibatch_update(groups, theta: List[Point], d1: float, d2: float, key: int, anchor: Anchor,
                     decay) -> List[Point]:
    """θ_{t+1} = γ2·θ_t − η2·((c1 − c2)·z_t + c_a·z_a), c_i = d_i/μ, from θ_t's point `theta`."""
    return [th.scaled(decay(g["lr"], g["weight_decay"])).plus([(key, -g["lr"] * ((d1 - d2) / g["eps"])),
                                                               (anchor.key, -g["lr"] * ca)])
            for g, th, ca in zip(groups, theta, anchor.c)]


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
        **options: as for every ZO optimizer (see ZOOptimizer).  snapshot=True with anchor="dense"
            covers the anchor buffers too (the weights' memory twice more), so a retried step rounds
            exactly as one that never failed.  Without it a failed step restores by the step's own
            passes: anchor="dense" moves the weights only by ±μz as MeZO does and has its guarantee;
            anchor="replay" comes back from θ̄ ± μz by a multi-key jump, exact only up to the
            roundings of its jumps (not bounded here: use snapshot).  With
            distributed=True, full_closure too returns this rank's mean (or (mean, count)) over its
            part of the full / large batch; DTensor (sharded) parameters need anchor="replay".

    Returns from step: (l+ + l−)/2 at θ_t -- of full_closure on full steps, of closure otherwise.
    """

    _group_checks = {"lr": False, "lr_full": False, "eps": True, "weight_decay": False}

    def __init__(self, params, lr: float, lr_full: float, eps: float = 1e-3, q: int = 2, seed: int = 0,
                 anchor: str = "dense", weight_decay: float = 0.0, **options):
        if isinstance(q, bool) or not isinstance(q, int):
            raise TypeError(f"q must be an int >= 1, got {type(q).__name__}")
        if q < 1:
            raise ValueError(f"Invalid q: {q} (must be >= 1)")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        self.q = q
        self.anchor = anchor
        self._anchor: Optional[Anchor] = None
        self._theta: Optional[List[Point]] = None     # replay: θ_t per group, a point over θ̄
        self._buf_at: Optional[List[Point]] = None    # dense: where each group's anchor buffer is, over θ̄
        super().__init__(params, dict(lr=lr, lr_full=lr_full, eps=eps, weight_decay=weight_decay), seed=seed,
                         **options)
        if anchor == "dense" and any(_zdist.is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise ValueError("MeZOSVRG anchor='dense' swaps parameter storages, which sharded (DTensor / FSDP2) "
                             "parameters do not allow; use anchor='replay' (no weight-sized buffer at all)")

    def _options(self) -> dict:
        return {"q": self.q, "anchor": self.anchor}

    @property
    def is_full_step(self) -> bool:
        """True when the next step is a full step (needs full_closure): step_count % q == 0."""
        return self._t % self.q == 0

    # ---------------------------------------------------------- dense buffers
    def _state_layout(self, p: torch.Tensor) -> dict:
        """The tensor state kept for p (what load_state_dict accepts): the dense anchor, p's copy."""
        return {"anchor": (tuple(p.shape), p.dtype)} if self.anchor == "dense" else {}

    def _buffers(self, layout: Tracked, create: bool) -> List[List[torch.Tensor]]:
        out = []
        for ts in layout.tensors:
            bufs = []
            for p in ts:
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
        return [[by_ptr[p.data_ptr()] for p in ts] for ts in layout.tensors]

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
        if self.is_full_step:
            if full_closure is None:
                raise ValueError(f"MeZOSVRG step {self._t} is a full-batch step (step % q == 0, q={self.q}): "
                                 f"pass full_closure=..., a closure returning the loss on the full training "
                                 f"set or a large batch; check opt.is_full_step before building the batch")
            full_closure = self._require_closure(full_closure, "full_closure")
            return self._full_step(layout, full_closure)
        closure = self._require_closure(closure)
        if self._anchor is None:
            raise RuntimeError("MeZOSVRG: no anchor (the last full step failed); the next step must be a full step")
        if self._anchor.tids != layout.tids:
            raise RuntimeError("MeZOSVRG: the set of trainable tensors changed since the last full step; "
                               "change it only right before a full step (opt.is_full_step)")
        return self._minibatch_step(layout, closure)

    def _full_step(self, w: Tracked, full_closure) -> float:
        t = self._t
        a = step_key(self.seed, t)
        self._start_step(w)
        # The weights hold θ_t and θ_t becomes the new anchor: θ_t is the base point from here on.
        theta = list(w.at)
        with self._failing_back(w, theta):
            if self.anchor == "dense":
                with torch.no_grad():
                    for b, p in zip([b for bs in self._buffers(w, create=True) for b in bs], w.flat()):
                        b.copy_(p)
                self._anchor = None             # the buffer now holds θ_t; valid again after the update
                self._buf_at = origin(len(theta))
            lp, lm = self._sync_losses(*self._two_point(w, theta, a, full_closure))   # one all-reduce
            if not (math.isfinite(lp) and math.isfinite(lm)):
                return self._failed_step(w, theta, {"full loss+": lp, "full loss-": lm})
            d = (lp - lm) / 2.0
            new_theta = full_update(self.param_groups, d, a, self._decay)
            self._goto(w, new_theta, final=True)
            self._theta = new_theta if self.anchor == "replay" else None
            self._anchor = Anchor(a, [d / mu for mu in self._mus()], w.tids, t)
            self._t += 1
            return (lp + lm) / 2.0

    def _minibatch_step(self, w: Tracked, closure) -> float:
        t = self._t
        k = step_key(self.seed, t)
        replay = self.anchor == "replay"
        if replay:
            w.at = list(self._theta)
        theta = list(w.at)
        buf_at = self._buf_at
        # Tied aliases now, before any closure runs: a closure that edits param_groups changes the next step
        aliases = None if replay else [x for e in self._aliases(w) for x in e]
        # snapshot=True covers the anchor buffers too, so a retried step rounds exactly as an unfailed one
        self._start_step(w, [] if replay else [b for bs in self._buffers(w, create=False) for b in bs])

        def put_back():
            if self._snap is not None:
                self._buf_at = buf_at

        with self._failing_back(w, theta, put_back):
            l1p, l1m = self._two_point(w, theta, k, closure)                       # at θ_t
            if replay:
                l2p, l2m = self._two_point(w, origin(len(theta)), k, closure)      # at θ̄: one multi-key jump each
            else:
                l2p, l2m = self._at_dense_anchor(w, k, closure, aliases)
            l1p, l1m, l2p, l2m = self._sync_losses(l1p, l1m, l2p, l2m)   # distributed: one all-reduce
            losses = {"loss+": l1p, "loss-": l1m, "anchor loss+": l2p, "anchor loss-": l2m}
            if not all(math.isfinite(v) for v in losses.values()):
                return self._failed_step(w, theta, losses, put_back)
            new_theta = minibatch_update(self.param_groups, theta, (l1p - l1m) / 2.0, (l2p - l2m) / 2.0, k,
                                         self._anchor, self._decay)
            # Replay keeps θ_{t+1} over θ̄; dense bookkeeping is relative to θ_t and restarts at θ_{t+1}.
            self._goto(w, new_theta, final=True)
            if replay:
                self._theta = new_theta
            self._t += 1
            return (l1p + l1m) / 2.0

    def _at_dense_anchor(self, w: Tracked, key: int, closure, aliases: list):
        """The two evaluations at θ̄ ± μz(key) with the parameters' storages swapped for the anchor
        buffers (`aliases`: every parameter object of each trainable tensor, tied ones too, collected
        before the step's first closure), so the closure runs unchanged."""
        bufs = Tracked(self._buffers(w, create=False), w.tids, self._buf_at)
        swapped = self._swap(aliases, bufs.flat())
        try:
            losses = self._two_point(bufs, origin(len(w.at)), key, closure, log=False)
            if self._exact_active(bufs.flat()):
                # Exact restore cannot carry an excursion across steps: bring θ̄ back now
                # (one more pass) instead of moving it straight to θ̄ + μz_{t+1} next step.
                self._goto(bufs, origin(len(w.at)), log=False)
            return losses
        finally:
            self._buf_at = bufs.at          # where the buffers are, whatever happened
            self._swap(aliases, swapped)

    # ---------------------------------------------------------------- state
    def _zo_state(self) -> dict:
        zo = super()._zo_state()
        zo.update(q=self.q, anchor_mode=self.anchor,
                  anchor=None if self._anchor is None else asdict(self._anchor),
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
        self._anchor = None if anc is None else Anchor(int(anc["key"]), [float(c) for c in anc["c"]],
                                                       [list(map(int, x)) for x in anc["tids"]], int(anc["step"]))
        self._theta = None if zo.get("theta") is None else [Point.from_state(s) for s in zo["theta"]]
        self._buf_at = None if zo.get("buf_at") is None else [Point.from_state(s) for s in zo["buf_at"]]
