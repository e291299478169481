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
"""
from __future__ import annotations

from typing import Callable, List

import torch

from ..adam import noise_adam_
from ..noise import mix_keys, step_key
from .noise_form import noise_kw
from .points import Tracked, origin
from .sharded_state import local_state, zeros_state
from .spsa import SPSAOptimizer

_ADAM_TAG = 0x4144414D  # "ADAM": rounding keys of the Adam pass


class ZOAdam(SPSAOptimizer):
    """ZO-Adam: `loss = opt.step(closure)`.

    Args (besides MeZO's, no lookahead): betas (β₁, β₂); adam_eps ε (Adam's, not the perturbation
    scale `eps`); decoupled: AdamW-style weight decay; n_directions q.
    """

    _samples_layers = False     # m and v of every tensor change every step

    _group_checks = {"lr": False, "eps": True, "weight_decay": False, "adam_eps": True}

    def __init__(self, params, lr: float, eps: float = 1e-3, betas=(0.9, 0.999), adam_eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, *, decoupled: bool = False, n_directions: int = 1,
                 **core):
        if core.get("record"):
            raise ValueError("ZOAdam keeps dense m and v: record=True (replay from seeds) does not apply")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be a pair in [0, 1), got {betas!r}")
        if not isinstance(decoupled, bool):
            raise TypeError(f"decoupled must be a bool, got {type(decoupled).__name__}")
        self.decoupled = decoupled
        super().__init__(params, dict(lr=lr, eps=eps, betas=tuple(float(b) for b in betas), adam_eps=adam_eps,
                                      weight_decay=weight_decay), seed=seed, n_directions=n_directions, **core)

    def _state_layout(self, p: torch.Tensor) -> dict:
        """The tensor state kept for p (what load_state_dict accepts): float32 m and v shaped like p."""
        return {"exp_avg": (tuple(p.shape), torch.float32), "exp_avg_sq": (tuple(p.shape), torch.float32)}

    def _states(self, p: torch.Tensor):
        """(m, v) of p as the Adam pass sees them (local shards of DTensor state); created at zero."""
        st = self.state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = zeros_state(p)
            st["exp_avg_sq"] = zeros_state(p)
        return local_state(st["exp_avg"]), local_state(st["exp_avg_sq"])

    def _update(self, w: Tracked, keys: List[int], ds: List[float], closure: Callable) -> None:
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

    def _options(self) -> dict:
        return {**super()._options(), "decoupled": self.decoupled}
