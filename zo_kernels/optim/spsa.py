"""The q-direction two-point SPSA step that ZO-Bench's optimizer family shares (n-SPSA).

Step t, per group (μ = eps, z_j = z(direction_key(seed, t, j)), j = 0 … q−1):

    for j:  θ + μz_j → l+_j,   θ − μz_j → l−_j        each move one fused pass from where the last left
    d_j = (l+_j − l−_j) / 2                          the shared scalars (one all-reduce when distributed)
    c_j = d_j / (q·μ)                                 ĝ = Σ_j c_j z_j, the averaged SPSA estimate

then the subclass's update, which starts from θ − μz_{q−1}.  SPSAOptimizer's own update is ZO-SGD,
θ ← (1 − ηλ)θ − η·Σ_j c_j z_j, in ONE multi-key pass that also removes the last perturbation; q = 1
is MeZO exactly (direction 0 uses the step key).  Subclasses override `_coefficients` (what
multiplies z_j: ZO-SGD-Sign) or `_update` (momentum, Adam, the conservative candidates).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

from ..noise import mix_keys, step_key
from .base import ZOOptimizer
from .points import Point, Tracked

_DIRECTION_TAG = 0x444952  # "DIR": keys of directions j >= 1 of a step


def direction_key(seed: int, t: int, j: int) -> int:
    """Key of direction j of step t: the step key for j = 0 (so q = 1 is MeZO), derived keys after."""
    k = step_key(seed, t)
    return k if j == 0 else mix_keys(_DIRECTION_TAG, k, j)


def check_directions(q) -> int:
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise ValueError(f"n_directions must be an int >= 1, got {q!r}")
    return q


class SPSAOptimizer(ZOOptimizer):
    """Base of the q-direction SPSA optimizers (see the module doc).  Not lookahead-capable."""

    def __init__(self, params, defaults: dict, *, n_directions: int = 1, **core):
        self.n_directions = check_directions(n_directions)
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
        w = self._start_step(extra=self._snapshot_extra())
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

    def _snapshot_extra(self):
        """Hook: further tensors the update writes (dense state), for snapshot=True."""
        return ()

    # ------------------------------------------------------------- state
    def _options(self) -> dict:
        return {"n_directions": self.n_directions}

    def _zo_state(self) -> dict:
        zo = super()._zo_state()
        zo["n_directions"] = self.n_directions
        return zo

    def _load_zo_state(self, zo: dict) -> None:
        super()._load_zo_state(zo)
        q = int(zo.get("n_directions", self.n_directions))
        if q != self.n_directions:
            raise ValueError(f"state_dict was saved with n_directions={q}, this optimizer has {self.n_directions}")
