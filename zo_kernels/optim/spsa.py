"""The q-direction two-point SPSA step that ZO-Bench's optimizer family shares (n-SPSA).

Step t, per group (μ = eps, z_j = z(direction_key(seed, t, j)), j = 0 … q−1):

    for j:  θ + μz_j → l+_j,   θ − μz_j → l−_j        each move one fused pass from where the last left
    d_j = (l+_j − l−_j) / 2                          the shared scalars (one all-reduce when distributed)
    c_j = d_j / (q·μ)                                 ĝ = Σ_j c_j z_j, the averaged SPSA estimate

then the subclass's update, which starts from θ − μz_{q−1}.  SPSAOptimizer's own update is ZO-SGD,
θ ← (1 − ηλ)θ − η·Σ_j c_j z_j, in ONE multi-key pass that also removes the last perturbation; q = 1
is MeZO exactly (direction 0 uses the step key).  Subclasses override `_coefficients` (what
multiplies z_j: ZO-SGD-Sign) or `_update` (momentum, Adam, the conservative candidates).

Layer sampling (LeZO, Wang et al. 2024), `layer_fraction=ρ < 1`: step t perturbs and updates only
k = ⌈ρ·n⌉ of the n trainable tensors -- the k with the smallest mix_keys(LAYER_TAG, step_key(seed, t),
tensor id), a permutation drawn from the step key, so replay and resume are exact -- and its noise
passes leave the others out entirely (they are neither read nor written).  A kept tensor's noise is the
one it would have without sampling (same keys, same tensor id).  The update is NOT rescaled by 1/ρ,
as in LeZO (which zeroes the perturbation of the dropped layers and steps as MeZO): per step the
estimate is the SPSA estimate of the sampled tensors' gradient, so in expectation over the draw the
step is ρ·η·∇f -- a smaller effective rate, which the lr grid absorbs; rescaling would instead
multiply the variance of each sampled tensor's step by 1/ρ².  The unit is a parameter tensor (a
weight matrix or a bias), not a transformer block.  ρ = 1 (the default) is the step without sampling,
bit-identical.  Methods with per-tensor dense state (ZOAdam, ZOSGDMomentum) refuse ρ < 1: their state
of a skipped tensor would have to decay without its update.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

from ..noise import mix_keys, step_key
from .base import ZOOptimizer
from .points import Point, Tracked

_DIRECTION_TAG = 0x444952  # "DIR": keys of directions j >= 1 of a step
LAYER_TAG = 0x4C4159  # "LAY": the order in which layer sampling keeps tensors


def direction_key(seed: int, t: int, j: int) -> int:
    """Key of direction j of step t: the step key for j = 0 (so q = 1 is MeZO), derived keys after."""
    k = step_key(seed, t)
    return k if j == 0 else mix_keys(_DIRECTION_TAG, k, j)


def check_layer_fraction(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < rho <= 1.0:
        raise ValueError(f"layer_fraction must be a number in (0, 1], got {rho!r}")
    return float(rho)


def sampled_tids(tids: List[int], rho: float, key: int) -> set:
    """The tensor ids layer sampling keeps at a step with key `key`: the ⌈ρ·n⌉ smallest under
    mix_keys(LAYER_TAG, key, id) (the 1e-9 keeps ρ·n = 3.0000000000000004 at 3)."""
    k = max(1, math.ceil(rho * len(tids) - 1e-9))
    return set(sorted(tids, key=lambda t: (mix_keys(LAYER_TAG, key, t), t))[:k])


def check_directions(q) -> int:
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise ValueError(f"n_directions must be an int >= 1, got {q!r}")
    return q


class SPSAOptimizer(ZOOptimizer):
    """Base of the q-direction SPSA optimizers (see the module doc).  Not lookahead-capable.
    layer_fraction: ρ of layer sampling (see the module doc)."""

    _samples_layers = True      # False: per-tensor dense state, layer sampling refused

    def __init__(self, params, defaults: dict, *, n_directions: int = 1, layer_fraction: float = 1.0, **core):
        self.n_directions = check_directions(n_directions)
        self.layer_fraction = check_layer_fraction(layer_fraction)
        if self.layer_fraction < 1.0 and not self._samples_layers:
            raise ValueError(f"{type(self).__name__} keeps per-tensor state that layer sampling would leave "
                             f"stale; layer_fraction must be 1, got {layer_fraction!r}")
        super().__init__(params, defaults, **core)

    @property
    def queries_per_step(self) -> int:
        """Forward passes (loss evaluations) one step makes."""
        return 2 * self.n_directions

    # ------------------------------------------------------------- hooks
    def _coefficients(self, ds: List[float], group: dict) -> List[float]:
        """c_j of ĝ = Σ_j c_j z_j for one group: the averaged SPSA estimate d_j / (q·μ)."""
        q, mu = len(ds), group["eps"]
        return [d / (q * mu) for d in ds]

    def _update(self, w: Tracked, keys: List[int], ds: List[float], closure: Callable) -> None:
        """Apply the update from where the evaluations left the weights (θ − μz_{q−1}, w.at); the
        weights end at θ_{t+1}, the base point of the next step (w.at says where they are)."""
        tgt = []
        for g in self.param_groups:
            gamma = self._decay(g["lr"], g["weight_decay"])
            tgt.append(Point(gamma, [(k, -g["lr"] * c) for k, c in zip(keys, self._coefficients(ds, g))]))
        self._goto(w, tgt, final=True)

    def _before_perturb(self, closure: Callable) -> List[float]:
        """Hook: evaluations at θ_t before the first perturbation (ZO-SGD-Cons); their losses."""
        return []

    # -------------------------------------------------------------- step
    def step(self, closure: Optional[Callable] = None) -> float:
        if closure is None and self._closure_free_call():
            return None
        closure = self._require_closure(closure)
        w = self._start_step(self._step_layout(), extra=self._snapshot_extra())
        keys = [direction_key(self.seed, self._t, j) for j in range(self.n_directions)]
        entry = list(w.at)
        with self._failing_back(w, entry):
            pre = self._before_perturb(closure)
            evals = []
            for k in keys:
                evals.extend(self._two_point(w, entry, k, closure))
            synced = self._sync_losses(*pre, *evals)     # distributed: one all-reduce, global means
            pre, evals = synced[:len(pre)], synced[len(pre):]
            self._pre_losses = pre
            if not all(math.isfinite(x) for x in pre + evals):
                return self._failed_step(w, entry, {f"loss{'+-'[i % 2]}[{i // 2}]": x for i, x in enumerate(evals)})
            ds = [(evals[2 * j] - evals[2 * j + 1]) / 2.0 for j in range(len(keys))]
            self._update(w, keys, ds, closure)
            self._t += 1
            return sum(evals) / len(evals)

    def _step_layout(self) -> Tracked:
        """The tensors this step moves: all of them, or layer sampling's draw (module doc)."""
        w = self._layout()
        if self.layer_fraction == 1.0:
            return w
        keep = sampled_tids([t for ids in w.tids for t in ids], self.layer_fraction, step_key(self.seed, self._t))
        pairs = [[(p, t) for p, t in zip(ts, ids) if t in keep] for ts, ids in zip(w.tensors, w.tids)]
        return Tracked([[p for p, _ in g] for g in pairs], [[t for _, t in g] for g in pairs], w.at)

    def _snapshot_extra(self):
        """Hook: further tensors the update writes (dense state), for snapshot=True."""
        return ()

    # ------------------------------------------------------------- state
    def _options(self) -> dict:
        return {"n_directions": self.n_directions, "layer_fraction": self.layer_fraction}

    def _zo_state(self) -> dict:
        zo = super()._zo_state()
        zo["n_directions"] = self.n_directions
        zo["layer_fraction"] = self.layer_fraction
        return zo

    def _load_zo_state(self, zo: dict) -> None:
        super()._load_zo_state(zo)
        q = int(zo.get("n_directions", self.n_directions))
        if q != self.n_directions:
            raise ValueError(f"state_dict was saved with n_directions={q}, this optimizer has {self.n_directions}")
        rho = float(zo.get("layer_fraction", 1.0))
        if rho != self.layer_fraction:
            raise ValueError(f"state_dict was saved with layer_fraction={rho}, this optimizer has {self.layer_fraction}")
