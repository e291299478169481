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
from .base import Lin
from .spsa import SPSAOptimizer


class MeZO(SPSAOptimizer):
    """MeZO: `loss = opt.step(closure)`; closure() runs a forward pass and returns the loss.

    Args:
        params: parameters or parameter groups (groups may set lr, eps, weight_decay).
        lr: η.  eps: μ, the perturbation scale.  weight_decay: λ (θ ← θ − η(ĝ + λθ)).
        seed: base seed of the noise keys, an int in [0, 2**64); step t uses step_key(seed, t).
        lookahead: fuse the next step's +μz into the update pass (2 instead of 3 passes/step).
        n_directions: q ≥ 1 directions per step (n-SPSA, ZO-Bench's q): θ ← (1 − ηλ)θ − η·(1/q)Σ_j c_j z_j
            with c_j = (l+_j − l−_j)/2μ, applied in one multi-key pass (see spsa.py); 2q queries per step.
        record: keep `opt.trajectory`, a list of every noise_axpy_ call on the weights (see `replay`).
        rounding: "nearest" | "stochastic" rounding of the update pass of bf16/fp16 weights (the
            perturbation passes always round to nearest).  backend: noise_axpy_ backend.
        restore: "auto" (exact for bf16/fp16 weights, fused for fp32), "exact" or "fused".  Exact
            restore undoes a perturbation by inverting its rounding (zo_kernels.restore) instead of
            subtracting μz again, so half-precision weights do not drift; not with lookahead.
        plane_bits: residue-plane width for exact restore (0, 2, 4, 8 bits per element, allocated
            for the duration of a perturbation only); wider planes resolve more ambiguous elements.
        nan_policy: "raise" (default) or "skip" on a NaN/inf loss; either way θ is restored
            and the step counter is not advanced.
        snapshot: keep a copy of the trainable weights while a step runs, so that a failed step leaves
            them bit-identical for every dtype and restore mode, and a retried run is bit-identical to
            one that never failed (see "A failed step" below).  Cost: one more read+write pass per step
            (the copy) and the trainable weights' memory once more, kept between steps.
        distributed: data parallel over torch.distributed (see zo_kernels.distributed): each rank's
            closure returns the mean loss over its part of the batch, or (mean loss, count); one
            all-reduce of a few scalars per step makes every rank apply the same update.  None (the
            default) turns it on only for DTensor (FSDP2-sharded) parameters.  process_group: the
            ranks to reduce over (default: the world).

    Returns from step: (l+ + l−)/2, the two-point estimate of the loss at θ_t on this batch.

    A failed step -- the closure raises (any exception, KeyboardInterrupt too) or returns NaN/inf
    before the update -- does not advance the step counter and brings the weights back to where
    `step` found them: θ_t, or with lookahead θ_t + μz_t with the perturbation still pending.
    With snapshot=True they are bit-identical.  Without it the way back is one more pass of the
    step's own kind (no extra memory), which is exact up to these limits:
      * exact restore (bf16/fp16 with restore="auto", or restore="exact"): bit-identical except
        elements where θ ± μz lies more than plane_bits binades above θ (above the grid just below
        θ, for a power of two), where its rounding cannot be inverted uniquely -- for plane_bits >= 2
        only where |θ| < μ|z|/(2^plane_bits − 1); those come back within one ulp of θ ± μz.
      * fused restore (fp32 with restore="auto", restore="fused", lookahead): each element comes
        back as round(round(round(θ + μz) − 2μz) + μz), within 1.5 ulp of |θ| + 2μ|z| of θ.

    Groups with different eps: the shared scalar is d = (l+ − l−)/2 and group g uses
    c_g = d/μ_g, an unbiased estimate of its gradient part (E[(Σ_h μ_h ∇_h·z_h) z_g]/μ_g = ∇_g).
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 lookahead: bool = False, *, record: bool = False, rounding: str = "nearest",
                 backend: Optional[str] = None, nan_policy: str = "raise", restore: str = "auto",
                 plane_bits: int = 2, snapshot: bool = False, distributed: Optional[bool] = None,
                 process_group=None, n_directions: int = 1):
        if not isinstance(lookahead, bool):
            raise TypeError(f"lookahead must be a bool, got {type(lookahead).__name__}")
        if lookahead and restore == "exact":
            raise ValueError("lookahead=True keeps the weights perturbed across steps, which exact restore "
                             "cannot invert; use restore='fused' (or 'auto') with lookahead")
        if lookahead and n_directions != 1:
            raise ValueError("lookahead=True fuses one direction into the update; use n_directions=1 with it")
        self.lookahead = lookahead
        # Pending lookahead perturbation: {"key", "tids", "tensors", "offsets": [Lin or None]}.
        self._pending = None
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed, record=record,
                         rounding=rounding, backend=backend, nan_policy=nan_policy, restore=restore,
                         plane_bits=plane_bits, snapshot=snapshot, distributed=distributed,
                         process_group=process_group, n_directions=n_directions)

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
            self._goto(pend["tensors"], pend["tids"], pend["offsets"], [Lin() for _ in pend["offsets"]])
        finally:
            self._pending = None
            self._in_step = False

    # ----------------------------------------------------------------- step
    def step(self, closure: Optional[Callable] = None) -> float:
        if closure is None and self._closure_free_call():
            return None
        closure = self._require_closure(closure)
        if self.n_directions > 1:
            return super().step(closure)        # n-SPSA: spsa.py, one multi-key update pass
        layout = self._layout()
        tids = self._tids(layout)
        if self._pending is not None and self._pending["tids"] != tids:
            self.settle()           # the set of trainable tensors changed since the last step
        self._check_ranks(layout)   # distributed: all ranks agree (first step), step fingerprint
        tensors = [[p for p, _ in e] for e in layout]
        groups = self.param_groups
        mus = [g["eps"] for g in groups]
        t = self._t
        k = step_key(self.seed, t)
        pend = self._pending
        entry = pend["offsets"] if pend is not None else [Lin() for _ in groups]   # where step found them
        cur = entry
        self._pending = None
        self._begin_step()
        self._take_snapshot(tensors)
        theta = [Lin() for _ in groups]          # θ_t, the base point
        try:
            cur = self._goto(tensors, tids, cur, [Lin(1.0, [(k, mu)]) for mu in mus])
            lp = self._eval(closure)
            cur = self._goto(tensors, tids, cur, [Lin(1.0, [(k, -mu)]) for mu in mus])
            lm = self._eval(closure)
            lp, lm = self._sync_losses(lp, lm)       # distributed: one all-reduce, global means
            if not (math.isfinite(lp) and math.isfinite(lm)):
                cur = self._restore_failed(tensors, tids, cur, entry)
                self._pending = pend
                return self._non_finite({"loss+": lp, "loss-": lm})
            d = (lp - lm) / 2.0
            k1 = step_key(self.seed, t + 1) if self.lookahead else None
            tgt = []
            for g, mu in zip(groups, mus):
                lr, wd = g["lr"], g["weight_decay"]
                gamma = self._decay(lr, wd)
                terms = [(k, -lr * (d / mu))]
                if self.lookahead:
                    terms.append((k1, mu))
                tgt.append(Lin(gamma, terms))
            cur = self._goto(tensors, tids, cur, tgt, final=True)
            self._t += 1
            if self.lookahead:
                # Rebase on θ_{t+1}: the weights are θ_{t+1} + μ z_{t+1}.
                self._pending = {"key": k1, "tids": tids, "tensors": tensors,
                                 "offsets": [Lin(1.0, [(k1, mu)]) for mu in mus]}
            return (lp + lm) / 2.0
        except BaseException:
            if self._t == t:          # failed before the update: the weights go back to where step found them
                self._restore_failed(tensors, tids, cur, entry)
                self._pending = pend
            raise
        finally:
            self._snap = None
            self._in_step = False

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
