"""FZOO (Dang et al. 2025, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models
towards Adam-Scale Speed"): N one-sided perturbations and one clean forward, step size normalised by
the spread of the N losses.

Step t, per group (μ = eps, η = lr, λ = weight_decay, γ = 1 − ηλ, z_i = z(direction_key(seed, t, i)),
Rademacher ±1 by default):

    l_0 = f(θ)                                          the clean forward, first
    l_i = f(θ + μz_i)                i = 1 … N           θ+μz_{i−1} → θ+μz_i: one pass with two keys
    σ   = std(l_1 … l_N)             population (the authors' unbiased=False)
    c_i = (l_i − l_0) / (N·σ)                            no division by μ: σ carries the scale
    θ  ← γθ − η·Σ_i c_i z_i                              ONE multi-key pass from θ + μz_N (it also removes μz_N)

The authors' zo_step/zo_update (their trainer.py) evaluate the N perturbed points first and the clean
one last, and apply the update one direction at a time; the order of the forwards does not change
the algorithm, and here the N + 1 weight passes per step are the N moves and the one update.
σ = 0 (all N losses equal, e.g. a loss flat at this scale): every c_i is 0, so the step makes no
gradient move (θ ← γθ: weight decay alone) instead of dividing by zero.  Queries per step: N + 1
(`queries_per_step`).  Returns from step: l_0, the loss at θ_t on the batch.  A NaN/inf among the
N + 1 losses is a failed step (ZOOptimizer: weights back where step found them, counter not advanced).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

from .points import Point
from .spsa import SPSAOptimizer, direction_key


def fzoo_coefficients(l0: float, losses: List[float]) -> List[float]:
    """c_i = (l_i − l_0)/(N·σ), σ the population std of the N losses; all 0 when the losses are equal."""
    n = len(losses)
    if max(losses) == min(losses):
        return [0.0] * n
    mean = sum(losses) / n
    sigma = math.sqrt(sum((x - mean) ** 2 for x in losses) / n)
    return [(x - l0) / (n * sigma) for x in losses]


class FZOO(SPSAOptimizer):
    """FZOO: `loss = opt.step(closure)`.

    Args: lr η, eps μ, weight_decay λ, seed, n_directions N ≥ 2 (the paper's 8), noise ("rademacher",
    the paper's ±1, or "gaussian"), layer_fraction ρ (layer sampling, spsa.py), and the core options of
    every ZO optimizer (record, rounding, backend, nan_policy, restore, plane_bits, snapshot,
    distributed).  The authors' example for OPT-13B: lr 5e-5, eps 1e-4, N = 8.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, *,
                 n_directions: int = 8, noise: str = "rademacher", **core):
        if isinstance(n_directions, int) and not isinstance(n_directions, bool) and n_directions == 1:
            raise ValueError("FZOO needs n_directions >= 2: σ, the spread of the N losses, is 0 for one")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         n_directions=n_directions, noise=noise, **core)

    @property
    def queries_per_step(self) -> int:
        return self.n_directions + 1

    def step(self, closure: Optional[Callable] = None) -> float:
        if closure is None and self._closure_free_call():
            return None
        closure = self._require_closure(closure)
        w = self._start_step(self._step_layout())
        keys = [direction_key(self.seed, self._t, i) for i in range(self.n_directions)]
        entry = list(w.at)
        with self._failing_back(w, entry):
            evals = [self._closure_loss(closure)]
            for k in keys:
                self._goto(w, [c.plus([(k, mu)]) for c, mu in zip(entry, self._mus())])
                evals.append(self._closure_loss(closure))
            l0, *losses = self._sync_losses(*evals)     # distributed: one all-reduce, global means
            if not all(math.isfinite(x) for x in [l0] + losses):
                return self._failed_step(w, entry, {"loss0": l0, **{f"loss[{i}]": x for i, x in enumerate(losses)}})
            cs = fzoo_coefficients(l0, losses)
            self._goto(w, [Point(self._decay(g["lr"], g["weight_decay"]), [(k, -g["lr"] * c) for k, c in zip(keys, cs)])
                           for g in self.param_groups], final=True)
            self._t += 1
            return l0
