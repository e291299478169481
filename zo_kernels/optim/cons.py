"""ZO-SGD-Cons (ZO-Bench's conservative ZO-SGD): take the ZO-SGD step only if it lowers the loss.

Step t, per group (μ = eps, η = lr, λ = weight_decay, ĝ = Σ_j c_j z_j the q-direction SPSA estimate
of spsa.py, γ = 1 − ηλ):

    l0 = f(θ)                                                   one extra query, before perturbing
    d_j from f(θ ± μz_j)                                        2q queries
    θ₋ = γθ − ηĝ,  l1 = f(θ₋);   θ₊ = γθ + ηĝ,  l2 = f(θ₊)        two more queries, one pass each
    θ ← argmin over {θ: l0, θ₋: l1, θ₊: l2}                    one pass (none if θ₊ wins)

ZO-Bench's `zo_conserv` trainer does the same with q = 1 (ties and NaN: the earlier candidate wins;
a NaN candidate never does).  Queries per step: 2q + 3 (`queries_per_step`); `last_choice` says which
point the last step kept ("theta", "minus", "plus").
"""
from __future__ import annotations

import math
from typing import Callable, List

from .points import Point, Tracked, origin
from .spsa import SPSAOptimizer

CHOICES = ("theta", "minus", "plus")


class ZOSGDCons(SPSAOptimizer):
    """ZO-SGD-Cons: `loss = opt.step(closure)`.  Arguments as MeZO (no lookahead) plus n_directions=q."""

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, *,
                 n_directions: int = 1, **core):
        self.last_choice = None
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         n_directions=n_directions, **core)

    @property
    def queries_per_step(self) -> int:
        return 2 * self.n_directions + 3

    def _before_perturb(self, closure: Callable) -> List[float]:
        return [self._closure_loss(closure)]

    def _update(self, w: Tracked, keys: List[int], ds: List[float], closure: Callable) -> None:
        minus, plus = [], []
        for g in self.param_groups:
            gamma = self._decay(g["lr"], g["weight_decay"])
            step = [(k, g["lr"] * c) for k, c in zip(keys, self._coefficients(ds, g))]
            minus.append(Point(gamma, [(k, -a) for k, a in step]))
            plus.append(Point(gamma, step))
        self._goto(w, minus)
        l1 = self._closure_loss(closure)
        self._goto(w, plus)
        l2 = self._closure_loss(closure)
        l1, l2 = self._sync_losses(l1, l2)
        losses = [self._pre_losses[0], l1, l2]
        best = min(range(3), key=lambda i: (not math.isfinite(losses[i]),
                                            losses[i] if math.isfinite(losses[i]) else 0.0, i))
        self.last_choice = CHOICES[best]
        self._goto(w, (origin(len(plus)), minus, plus)[best], final=True)   # the next step's base point
