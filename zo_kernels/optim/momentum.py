"""ZO-SGD with momentum (ZO-SGD-MMT, ZO-Bench), with the momentum dense or rebuilt from seeds.

Step t, per group (μ = eps, η = lr, β = momentum, λ = weight_decay, ĝ_t = Σ_j c_{t,j} z_{t,j} the
q-direction SPSA estimate of spsa.py):

    m_t = β·m_{t−1} + ĝ_t                  (torch.optim.SGD's momentum, no dampening)
    θ_{t+1} = (1 − ηλ)·θ_t − η·m_t          (decoupled weight decay, as MeZO here)

state="dense": m is one float32 buffer per parameter (weight-sized, the usual way).  After the
evaluations: one pass θ ← (1 − ηλ)θ − η Σ_j c_j z_j (also the restore), one pass θ ← θ − ηβ·m_{t−1}
(dense term), one pass m ← β·m + Σ_j c_j z_j.  FSDP2 (DTensor parameters): m is a DTensor sharded like
its parameter (torch.optim's convention, zo_kernels.optim.sharded_state), so each rank keeps and updates
the momentum of its own shard, with z at the shard's global offsets; it is `opt.state[p]["momentum_buffer"]`
in the state_dict.

state="seeded": no weight-sized state.  m_t = Σ_{s ≤ t} β^{t−s} ĝ_s is a sum of seeded noise, so it is
rebuilt from the last K steps' (key, coefficient) pairs,

    m̃_t = Σ_{s = t−K+1}^{t} β^{t−s} ĝ_s,       θ_{t+1} = (1 − ηλ)·θ_t − η·m̃_t

in ONE fused pass of K·q keys (which also removes the last perturbation).  Truncation: in exact
arithmetic m_t − m̃_t = β^K·m_{t−K}, so the seeded momentum is the dense one up to a relative error
β^K of a K-step-old momentum (β = 0.9: K = 22 → 0.098, K = 44 → 0.0097, K = 66 → 0.00096); each step
costs K·q Philox evaluations per element instead of q (compute, not memory: one read and one write of θ).
The window is state_dict state; replay and record work as for MeZO.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, List

import torch

from ..noise import mix_keys, step_key
from ..ops import noise_axpy_
from .noise_form import noise_kw
from .points import Point, Tracked
from .sharded_state import local_state, zeros_state
from .spsa import SPSAOptimizer

STATES = ("dense", "seeded")


class ZOSGDMomentum(SPSAOptimizer):
    """ZO-SGD-MMT: `loss = opt.step(closure)`.

    Args (besides MeZO's, no lookahead): momentum β in [0, 1); state "dense" | "seeded";
    window K (seeded only: steps of history, truncation error β^K relative); n_directions q.
    """

    _samples_layers = False     # the momentum of every tensor changes every step

    def __init__(self, params, lr: float, eps: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 seed: int = 0, *, state: str = "seeded", window: int = 32, n_directions: int = 1, **core):
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if state == "dense" and core.get("record"):
            raise ValueError("record=True (replay) needs state='seeded': dense momentum is not a sum of seeds")
        self.state_mode = state
        self.window = window
        # Seeded: the last K steps, oldest first: (keys, [per group: coefficients c_j]).
        self._history: deque = deque(maxlen=window)
        super().__init__(params, dict(lr=lr, eps=eps, momentum=float(momentum), weight_decay=weight_decay),
                         seed=seed, n_directions=n_directions, **core)

    def truncation_bound(self, group: int = 0) -> float:
        """β^K: the relative size of the momentum the window drops (see the module doc)."""
        return self.param_groups[group]["momentum"] ** self.window

    def _update(self, w: Tracked, keys: List[int], ds: List[float], closure: Callable) -> None:
        coeffs = [self._coefficients(ds, g) for g in self.param_groups]
        if self.state_mode == "seeded":
            self._history.append((list(keys), coeffs))
            tgt = []
            for gi, g in enumerate(self.param_groups):
                beta, n = g["momentum"], len(self._history)
                terms = [(k, -g["lr"] * beta ** (n - 1 - s) * c)
                         for s, (ks, cs) in enumerate(self._history) for k, c in zip(ks, cs[gi])]
                tgt.append(Point(self._decay(g["lr"], g["weight_decay"]), terms))
            self._goto(w, tgt, final=True)
            return
        # dense: θ ← γθ − η ĝ (with the restore), θ ← θ − ηβ m, m ← β m + ĝ
        tgt = [Point(self._decay(g["lr"], g["weight_decay"]), [(k, -g["lr"] * c) for k, c in zip(keys, cs)])
               for g, cs in zip(self.param_groups, coeffs)]
        self._goto(w, tgt, final=True)
        for gi, (g, ts, ids) in enumerate(zip(self.param_groups, w.tensors, w.tids)):
            if not ts:
                continue
            rkey = self._dense_rounding_key()       # advanced on every rank, whatever its shards
            bufs = {id(p): self._buffer(p) for p in ts}     # an empty shard too: every rank has every entry
            loc = self._local_group(ts, ids)
            if not loc.shards:
                continue
            bufs = [bufs[id(p)] for p in loc.params]
            noise_axpy_(loc.shards, [], [], dense=bufs, beta=-g["lr"] * g["momentum"], rounding=self.rounding,
                        tensor_ids=loc.tids, offsets=loc.offsets, rounding_key=rkey, backend=self.backend)
            noise_axpy_(bufs, keys, coeffs[gi], gamma=g["momentum"], tensor_ids=loc.tids, offsets=loc.offsets,
                        backend=self.backend, **noise_kw(self.noise))
            self._refresh(loc.params)

    def _state_layout(self, p: torch.Tensor) -> dict:
        """The tensor state kept for p (what load_state_dict accepts): dense mode's float32 buffer."""
        return {"momentum_buffer": (tuple(p.shape), torch.float32)} if self.state_mode == "dense" else {}

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        """m of p as the passes see it (the local shard of a DTensor buffer); created at zero."""
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = zeros_state(p)
        return local_state(st["momentum_buffer"])

    def _dense_rounding_key(self) -> int:
        self._call_idx += 1
        return mix_keys(0x4D4D54, step_key(self.seed, self._t), self._call_idx)

    # ------------------------------------------------------------- state
    def _zo_state(self) -> dict:
        zo = super()._zo_state()
        zo.update(state=self.state_mode, window=self.window,
                  history=[[list(ks), [list(c) for c in cs]] for ks, cs in self._history])
        return zo

    def _load_zo_state(self, zo: dict) -> None:
        super()._load_zo_state(zo)
        if zo.get("state") != self.state_mode or int(zo.get("window", self.window)) != self.window:
            raise ValueError(f"state_dict was saved with state={zo.get('state')!r}, window={zo.get('window')}; "
                             f"this optimizer has state={self.state_mode!r}, window={self.window}")
        self._history = deque((([int(k) for k in ks], [[float(c) for c in cg] for cg in cs])
                               for ks, cs in zo.get("history", [])), maxlen=self.window)

    def _options(self) -> dict:
        return {**super()._options(), "state": self.state_mode, "window": self.window}

