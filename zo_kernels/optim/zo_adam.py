"""ZO-Adam (ZO-Bench, Zhang et al. 2024): Adam on the SPSA gradient estimate, with the fused Adam pass.

Step t (k = t + 1), per group (μ = eps, η = lr, λ = weight_decay, ĝ = Σ_j c_j z_j the q-direction
SPSA estimate of spsa.py, c_j = d_j / (q·μ)):

    g   = ĝ + λθ                      (decoupled=True: g = ĝ, and θ ← (1 − ηλ)θ below, as AdamW)
    m   ← β₁·m + (1 − β₁)·g
    v   ← β₂·v + (1 − β₂)·g²
    θ   ← θ − η·m̂ / (√v̂ + ε),         m̂ = m / (1 − β₁ᵏ),  v̂ = v / (1 − β₂ᵏ)

i.e. torch.optim.Adam with param.grad = ĝ, which is how ZO-Bench runs it (a weight-sized grad tensor
per step).  Here, after the evaluations, one pass removes the last perturbation and one
`zo_kernels.noise_adam_` pass regenerates z and updates θ, m and v together: no z or gradient tensor.
m and v are dense float32 state (two weight-sized buffers: Adam's second moment is elementwise and
cannot be rebuilt from seeds), in `opt.state[p]` and the state_dict.  Not recordable for replay.
FSDP2 (DTensor parameters): m and v are DTensors sharded like their parameter (torch.optim's convention,
zo_kernels.optim.sharded_state), so a rank holds 2× its shard of state and the Adam pass runs on the local
shards at their global offsets (z, and the stochastic-rounding bits, are the whole tensor's slices).

state="seeded", window=K: no weight-sized state.  With ±1 noise (noise="rademacher"), one direction and no
coupled L2 term (weight_decay 0, or decoupled=True), g = c·s with s² = 1, so g² = c² for every element:
the second moment is ONE scalar per group, v ← β₂·v + (1 − β₂)·c², exactly.  The first moment
m_t = (1 − β₁)·Σ_{s ≤ t} β₁^{t−s}·c_s·s_s is a sum of seeded noise, rebuilt like seeded momentum's from the
last K steps' (key, c) pairs:

    θ ← γθ − Σ_{s = t−K+1}^{t} [η·(1 − β₁)·β₁^{t−s}·c_s / ((1 − β₁ᵏ)·(√(v/(1 − β₂ᵏ)) + ε))]·s_s

ONE fused pass of K keys (it also removes the last perturbation).  Truncation: m_t − m̃_t = β₁^K·m_{t−K},
relative error β₁^K of a K-step-old moment (β₁ = 0.9: K = 32 → 0.034, K = 64 → 0.0012); each step costs K
sign blocks per 128 elements (one Philox call each) instead of one.  With Gaussian z, g² = c²·z² is
elementwise and no scalar carries it, so state="seeded" refuses noise="gaussian" (and n_directions > 1,
whose g² has cross terms, and a coupled L2 term λθ, which is not seeded).  The window and the scalars v
are state_dict state; record and replay work (every move is a noise pass).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, List

import torch

from ..adam import noise_adam_
from ..noise import mix_keys, step_key
from .noise_form import noise_kw
from .points import Point, Tracked, origin
from .sharded_state import local_state, zeros_state
from .spsa import SPSAOptimizer

_ADAM_TAG = 0x4144414D  # "ADAM": rounding keys of the Adam pass


STATES = ("dense", "seeded")


class ZOAdam(SPSAOptimizer):
    """ZO-Adam: `loss = opt.step(closure)`.

    Args (besides MeZO's, no lookahead): betas (β₁, β₂); adam_eps ε (Adam's, not the perturbation
    scale `eps`); decoupled: AdamW-style weight decay; n_directions q; state "dense" (m, v tensors) or
    "seeded" (no weight-sized state: ±1 noise, module doc) with window K.
    """

    _samples_layers = False     # m and v of every tensor change every step

    _group_checks = {"lr": False, "eps": True, "weight_decay": False, "adam_eps": True}

    def __init__(self, params, lr: float, eps: float = 1e-3, betas=(0.9, 0.999), adam_eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, *, decoupled: bool = False, n_directions: int = 1,
                 state: str = "dense", window: int = 32, **core):
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if state == "dense" and core.get("record"):
            raise ValueError("ZOAdam keeps dense m and v: record=True (replay from seeds) needs state='seeded'")
        if state == "seeded":
            if core.get("noise", "gaussian") != "rademacher":
                raise ValueError("ZOAdam(state='seeded') needs noise='rademacher': with ±1 noise g² = c² is one "
                                 "scalar per group; Gaussian z makes g² = c²z² elementwise (a dense v)")
            if weight_decay and not decoupled:
                raise ValueError("ZOAdam(state='seeded') needs decoupled=True with weight_decay > 0: the coupled "
                                 "L2 term λθ is not a sum of seeds")
            if n_directions != 1:
                raise ValueError(f"ZOAdam(state='seeded') takes one direction per step (g² of q > 1 directions "
                                 f"has cross terms), got n_directions={n_directions!r}")
        self.state_mode = state
        self.window = window
        self._history: deque = deque(maxlen=window)     # seeded: the last K steps' (key, [c per group])
        self._v: List[float] = []                        # seeded: the scalar second moment of each group
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be a pair in [0, 1), got {betas!r}")
        if not isinstance(decoupled, bool):
            raise TypeError(f"decoupled must be a bool, got {type(decoupled).__name__}")
        self.decoupled = decoupled
        super().__init__(params, dict(lr=lr, eps=eps, betas=tuple(float(b) for b in betas), adam_eps=adam_eps,
                                      weight_decay=weight_decay), seed=seed, n_directions=n_directions, **core)

    def _state_layout(self, p: torch.Tensor) -> dict:
        """The tensor state kept for p (what load_state_dict accepts): float32 m and v shaped like p (none
        when seeded)."""
        if self.state_mode == "seeded":
            return {}
        return {"exp_avg": (tuple(p.shape), torch.float32), "exp_avg_sq": (tuple(p.shape), torch.float32)}

    def truncation_bound(self, group: int = 0) -> float:
        """β₁^K: the relative size of the first moment the seeded window drops (module doc)."""
        return self.param_groups[group]["betas"][0] ** self.window

    def _states(self, p: torch.Tensor):
        """(m, v) of p as the Adam pass sees them (local shards of DTensor state); created at zero."""
        st = self.state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = zeros_state(p)
            st["exp_avg_sq"] = zeros_state(p)
        return local_state(st["exp_avg"]), local_state(st["exp_avg_sq"])

    def _update(self, w: Tracked, keys: List[int], ds: List[float], closure: Callable) -> None:
        if self.state_mode == "seeded":
            return self._seeded_update(w, keys[0], ds)
        self._goto(w, origin(len(w.at)))          # remove the last perturbation (exact for bf16/fp16)
        for g, ts, ids in zip(self.param_groups, w.tensors, w.tids):
            if not ts:
                continue
            self._call_idx += 1                     # advanced on every rank, whatever its shards
            rkey = mix_keys(_ADAM_TAG, step_key(self.seed, self._t), self._call_idx)
            states = {id(p): self._states(p) for p in ts}    # an empty shard too: every rank has every entry
            loc = self._local_group(ts, ids)
            if not loc.shards:
                continue
            ms, vs = zip(*(states[id(p)] for p in loc.params))
            noise_adam_(loc.shards, list(ms), list(vs), keys, self._coefficients(ds, g), lr=g["lr"],
                        step=self._t + 1, betas=g["betas"], eps=g["adam_eps"], weight_decay=g["weight_decay"],
                        decoupled=self.decoupled, rounding=self.rounding, tensor_ids=loc.tids, offsets=loc.offsets,
                        rounding_key=rkey, backend=self.backend, **noise_kw(self.noise))
            self._refresh(loc.params)

    def _seeded_update(self, w: Tracked, key: int, ds: List[float]) -> None:
        """One pass of the last K keys (module doc): v per group a scalar, m rebuilt from the window."""
        cs = [self._coefficients(ds, g)[0] for g in self.param_groups]
        for g in self.param_groups:     # a group's own weight_decay (the constructor checked the default)
            if g["weight_decay"] and not self.decoupled:
                raise ValueError("ZOAdam(state='seeded') needs decoupled=True with weight_decay > 0: the coupled "
                                 "L2 term λθ is not a sum of seeds")
        self._history.append((key, cs))
        k = self._t + 1
        self._v = self._v or [0.0] * len(self.param_groups)
        tgt = []
        for gi, g in enumerate(self.param_groups):
            b1, b2 = g["betas"]
            self._v[gi] = b2 * self._v[gi] + (1.0 - b2) * cs[gi] ** 2
            denom = math.sqrt(self._v[gi] / (1.0 - b2 ** k)) + g["adam_eps"]
            scale = g["lr"] * (1.0 - b1) / ((1.0 - b1 ** k) * denom)
            n = len(self._history)
            terms = [(ks, -scale * b1 ** (n - 1 - s) * c[gi]) for s, (ks, c) in enumerate(self._history)]
            tgt.append(Point(self._decay(g["lr"], g["weight_decay"]) if self.decoupled else 1.0, terms))
        self._goto(w, tgt, final=True)

    def _options(self) -> dict:
        return {**super()._options(), "decoupled": self.decoupled, "state": self.state_mode, "window": self.window}

    def _zo_state(self) -> dict:
        zo = super()._zo_state()
        if self.state_mode == "seeded":
            zo.update(state="seeded", window=self.window, v=list(self._v),
                      history=[[int(k), [float(c) for c in cs]] for k, cs in self._history])
        return zo

    def _load_zo_state(self, zo: dict) -> None:
        super()._load_zo_state(zo)
        if zo.get("state", "dense") != self.state_mode or int(zo.get("window", self.window)) != self.window:
            raise ValueError(f"state_dict was saved with state={zo.get('state', 'dense')!r}, window="
                             f"{zo.get('window')}; this optimizer has state={self.state_mode!r}, window={self.window}")
        if self.state_mode == "seeded":
            self._v = [float(v) for v in zo.get("v", [])]
            self._history = deque(((int(k), [float(c) for c in cs]) for k, cs in zo.get("history", [])),
                                  maxlen=self.window)
