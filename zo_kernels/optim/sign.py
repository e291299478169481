"""ZO-SGD-Sign (ZO-Bench, Zhang et al. 2024; signSGD on the SPSA estimate): step along the sign of
each direction's finite difference, not its size.

Step t, per group (μ = eps, η = lr, λ = weight_decay, q = n_directions, see spsa.py):

    d_j = (f(θ + μz_j) − f(θ − μz_j)) / 2                    j = 0 … q−1
    θ ← (1 − ηλ)θ − η · (1/q) Σ_j sign(d_j) z_j                one multi-key pass (also the restore)

ZO-Bench's `zo_sign_opt` trainer sets param.grad = sign(projected_grad)·z and calls torch SGD; here the
same update is one fused pass over θ.  sign(0) = 0: a tie moves nothing.
"""
from __future__ import annotations

from typing import List

from .spsa import SPSAOptimizer


class ZOSGDSign(SPSAOptimizer):
    """ZO-SGD-Sign: `loss = opt.step(closure)`.  Arguments as MeZO (no lookahead) plus n_directions=q."""

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, *,
                 n_directions: int = 1, **core):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         n_directions=n_directions, **core)

    def _coefficients(self, ds: List[float], group: dict) -> List[float]:
        q = len(ds)
        return [((d > 0) - (d < 0)) / q for d in ds]
