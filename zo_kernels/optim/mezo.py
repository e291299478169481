"""MeZO (Malladi et al. 2023): two-point SPSA with seeded noise, on the fused primitive.

Step t, per group (μ = eps, η = lr, λ = weight_decay, γ = 1 − ηλ, z = z(step_key(seed, t))):

    θ ← θ + μz            l+ = closure()
    θ ← θ − 2μz           l− = closure()
    c = (l+ − l−) / 2μ
    θ ← γθ + (γμ − ηc) z  restore and update in one pass:  = (1 − ηλ)θ_t − ηc z

i.e. the MeZO paper's update θ ← θ − η(c z + λθ).  With lookahead=True the next step's
+μ z_{t+1} is added in that same pass (two passes per step), so between steps the weights
sit at θ_{t+1} + μ z_{t+1}: see `settle`, `settled`, `watch`, `eval`, `state_dict`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from ..noise import step_key
from .points import Point, Tracked, origin
from .spsa import SPSAOptimizer


def mezo_update(groups, d: float, key: int, next_key: Optional[int], decay) -> list:
    """θ_{t+1} of each group as a point over θ_t: γθ_t − η·(d/μ)·z_t, plus μ·z_{t+1} with lookahead
    (next_key).  d = (l+ − l−)/2, shared by the groups; decay(η, λ) = γ."""
    out = []
    for g in groups:
        lr, mu = g["lr"], g["eps"]
        terms = [(key, -lr * (d / mu))]
        if next_key is not None:
            terms.append((next_key, mu))
        out.append(Point(decay(lr, g["weight_decay"]), terms))
    return out


class MeZO(SPSAOptimizer):
    """MeZO: `loss = opt.step(closure)`; closure() runs a forward pass and returns the loss.

    Args:
        params: parameters or parameter groups (groups may set lr, eps, weight_decay).
        lr: η.  eps: μ, the perturbation scale.  weight_decay: λ (θ ← θ − η(ĝ + λθ)).
        seed: base seed of the noise keys, an int in [0, 2**64); step t uses step_key(seed, t).
        lookahead: fuse the next step's +μz into the update pass (2 instead of 3 passes/step); the
            weights then stay perturbed between steps, so exact restore does not apply.
        n_directions: q ≥ 1 directions per step (n-SPSA, ZO-Bench's q): θ ← (1 − ηλ)θ − η·(1/q)Σ_j c_j z_j
            with c_j = (l+_j − l−_j)/2μ, applied in one multi-key pass (see spsa.py); 2q queries per step.
        layer_fraction: ρ in (0, 1], layer sampling (LeZO): each step perturbs and updates only
            ⌈ρ·n⌉ of the n trainable tensors, chosen from the step key (see spsa.py); 1 (default): all.
        **options: record, rounding, backend, nan_policy, restore, plane_bits, snapshot, distributed,
            process_group, noise -- the options of every ZO optimizer (see ZOOptimizer).

    Returns from step: (l+ + l−)/2, the two-point estimate of the loss at θ_t on this batch.  A failed
    step brings the weights back to where `step` found them (ZOOptimizer, "A failed step"): θ_t, or
    with lookahead θ_t + μz_t with the perturbation still pending.

    Groups with different eps: the shared scalar is d = (l+ − l−)/2 and group g uses
    c_g = d/μ_g, an unbiased estimate of its gradient part (E[(Σ_h μ_h ∇_h·z_h) z_g]/μ_g = ∇_g).
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 lookahead: bool = False, *, n_directions: int = 1, **options):
        if not isinstance(lookahead, bool):
            raise TypeError(f"lookahead must be a bool, got {type(lookahead).__name__}")
        if lookahead and options.get("restore") == "exact":
            raise ValueError("lookahead=True keeps the weights perturbed across steps, which exact restore "
                             "cannot invert; use restore='fused' (or 'auto') with lookahead")
        if lookahead and n_directions != 1:
            raise ValueError("lookahead=True fuses one direction into the update; use n_directions=1 with it")
        if lookahead and options.get("layer_fraction", 1.0) != 1.0:
            raise ValueError("lookahead=True perturbs the next step's tensors before it draws them; use "
                             "layer_fraction=1 with it")
        self.lookahead = lookahead
        # The lookahead perturbation the weights carry between steps: the storages and where they are.
        self._pending: Optional[Tracked] = None
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed,
                         n_directions=n_directions, **options)

    def _options(self) -> dict:
        return {"lookahead": self.lookahead, **super()._options()}

    def _exact_restore_allowed(self) -> bool:
        return not self.lookahead     # the weights stay perturbed between steps

    # ------------------------------------------------------------ lookahead
    @property
    def is_perturbed(self) -> bool:
        return self._pending is not None

    def settle(self) -> None:
        """Remove the pending lookahead perturbation: the weights become θ_t (one pass)."""
        if self._pending is None:
            return
        pend = self._pending
        self._begin_step(first_call=1 << 20)   # its own stochastic-rounding keys, apart from the steps' calls
        try:
            self._goto(pend, origin(len(pend.at)))
        finally:
            self._pending = None
            self._in_step = False

    # ----------------------------------------------------------------- step
    def step(self, closure: Optional[Callable] = None) -> float:
        if closure is None and self._closure_free_call():
            return None
        closure = self._require_closure(closure)
        if self.n_directions > 1 or self.layer_fraction < 1.0:
            return super().step(closure)        # n-SPSA, layer sampling: spsa.py (q = 1 there is this step)
        w = self._layout()
        if self._pending is not None and self._pending.tids != w.tids:
            self.settle()           # the set of trainable tensors changed since the last step
        pend = self._pending
        entry = list(pend.at) if pend is not None else list(w.at)     # where step found the weights
        w.at = list(entry)
        self._start_step(w)
        self._pending = None
        t = self._t
        k = step_key(self.seed, t)

        def put_back():
            self._pending = pend

        with self._failing_back(w, entry, put_back):
            lp, lm = self._sync_losses(*self._two_point(w, origin(len(entry)), k, closure))   # one all-reduce
            if not (math.isfinite(lp) and math.isfinite(lm)):
                return self._failed_step(w, entry, {"loss+": lp, "loss-": lm}, put_back)
            k1 = step_key(self.seed, t + 1) if self.lookahead else None
            self._goto(w, mezo_update(self.param_groups, (lp - lm) / 2.0, k, k1, self._decay), final=True)
            self._t += 1
            if self.lookahead:
                # Rebase on θ_{t+1}: the weights are θ_{t+1} + μ z_{t+1}.
                self._pending = Tracked(w.tensors, w.tids, [Point(1.0, [(k1, g["eps"])]) for g in self.param_groups])
            return (lp + lm) / 2.0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Settles a pending lookahead perturbation first (one pass, one rounding), so the weights
        saved next to this state are θ_t; resuming then matches a run that settled at this step."""
        self.settle()
        sd = super().state_dict()
        sd["zo"]["lookahead"] = self.lookahead
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self.settle()
        super().load_state_dict(state_dict)
