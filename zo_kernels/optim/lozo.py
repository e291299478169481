"""LOZO and LOZO-M (Chen et al., ICLR 2025): low-rank two-point ZO with lazy subspace sampling.

Step t, per group (μ = eps, η = lr, λ = weight_decay, γ = 1 − ηλ, r = rank, ν = nu):

    key_u = step_key(seed, t)            U_t (m×r per matrix), redrawn every step
    key_v = step_key(seed, ν·⌊t/ν⌋)      V   (n×r per matrix), kept for ν steps
    Z_t = U_t Vᵀ for tensors with ndim ≥ 2 (viewed as (shape[0], rest)); z(key_u) for the others

    θ ← θ + μZ_t          l+ = closure()
    θ ← θ − 2μZ_t         l− = closure()
    c = (l+ − l−) / 2μ
    LOZO:   θ ← γθ_t − ηc Z_t                                    (restore and update: one pass)
    LOZO-M: M ← β M + (1 − β) c U_t ;  θ ← γθ_t − η M Vᵀ          (M: m×r per matrix, U-space)

Every pass is one `zo_kernels.lowrank_noise_axpy_` (θ ← γθ + (Σ α_j U_j + β'·M) Vᵀ): U and V are
regenerated from their keys in the kernel, so LOZO's state is the step counter (V costs no memory,
where the authors' code keeps V in memory and materialises U Vᵀ four times a step).  LOZO-M's
update pass applies the momentum as the U-space term of the same pass.

LOZO-M across a V change (the authors' LOZOtrainer, `lowrank_zo_update_momentum`): M lives in the
span of the period's V, so at the first step of a new period it is carried over by projecting onto
the new V,

    M ← β · M V_oldᵀ V_new / n + (1 − β) c U_t            (n = the matrix's column count)

(V_oldᵀ V_new / n ≈ I_r·0 + noise: the old direction is mostly lost, as in the paper; V_old is
regenerated from the previous period's key, nothing is stored).  The very first step sets M = c U_t
(no (1 − β) factor), as the authors' code does.  Tensors with ndim < 2 keep an ordinary dense
momentum m ← β m + (1 − β) c z (m = c z at the first step), as in the authors' code.

FSDP2 (DTensor parameters, dim-0 shards): U's rows are global, so the rank holding rows i₀ … i₁ of a
matrix owns rows i₀ … i₁ of its M; V (n×r) is regenerated whole on every rank (each shard has all
columns).  `opt.state[p]["momentum"]` is then a DTensor of global shape (m, r) placed like p (a
1-D tensor's: shaped and placed like p), following torch.optim's convention that state is sharded
like its parameter (zo_kernels.optim.sharded_state); the state_dict holds these DTensors.

Shared with MeZO (zo_kernels.optim.base): parameter groups, NaN policy, exact restore for bf16/fp16,
data parallel (one all-reduce of scalars per step), state_dict (resume mid-period is bit-identical:
V's key is a function of the step), replay of a recorded trajectory (LOZO only: LOZO-M's momentum
is tensor state, so it refuses record=True).  No lookahead: at a period boundary the fused
"update + next perturbation" pass would need two V's.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from .. import distributed as _zdist
from ..lowrank import MAX_RANK, U_STREAM, V_STREAM, cols_of, lowrank_noise_axpy_
from ..noise import mix_keys, step_key
from ..ops import noise_, noise_axpy_
from ..validate import check_int
from .base import ZOOptimizer
from .noise_form import GAUSSIAN, check_noise_form
from .noise_path import Pass
from .points import Point
from .sharded_state import local_state, shard_like

# Pseudo-key of LOZO-M's momentum in the bookkeeping: the U-space term of the update pass.  Real keys
# are splitmix64 outputs; this one is reserved (a collision has probability 2^-64 per step).
MOMENTUM = (1 << 64) - 0x4D4F4D


class LOZO(ZOOptimizer):
    """LOZO: `loss = opt.step(closure)`; closure() runs a forward pass and returns the loss.

    Args:
        params: parameters or parameter groups (groups may set lr, eps, weight_decay).
        lr: η.  eps: μ.  rank: r, the rank of each matrix's perturbation U Vᵀ (1..64).
        nu: ν, steps per V (lazy subspace sampling).  weight_decay: λ.  seed: base seed.
        **options: record, rounding, backend, nan_policy, restore, plane_bits, snapshot, distributed,
            process_group -- as for every ZO optimizer (see ZOOptimizer; exact restore applies to
            bf16/fp16 weights by default); noise: "gaussian" only (U and V are Gaussian factors).

    Returns from step: (l+ + l−)/2.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, rank: int = 2, nu: int = 50, weight_decay: float = 0.0,
                 seed: int = 0, **options):
        if check_noise_form(options.get("noise", GAUSSIAN)) != GAUSSIAN:
            raise ValueError(f"{type(self).__name__} perturbs along U Vᵀ with Gaussian factors U and V (the "
                             f"low-rank op has no other form); noise={options['noise']!r} is not supported")
        self.rank = check_int(rank, "rank", 1, MAX_RANK)
        self.nu = check_int(nu, "nu", 1, 1 << 62)
        self._key_v: Optional[int] = None
        self._dense: dict = {}      # LOZO-M: tensor id -> the U-space term of the update pass
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed, **options)

    def period_key(self, t: Optional[int] = None) -> int:
        """key_v of step t (default: the next step): the key of the first step of its period."""
        t = self._t if t is None else t
        return step_key(self.seed, self.nu * (t // self.nu))

    # ------------------------------------------------------------- the noise path
    def _issue(self, p: Pass) -> dict:
        """Every weight move of the step is one low-rank pass under the period's key_v; LOZO-M's
        momentum pseudo-key becomes that pass's U-space term.  (LOZO-M refuses record=True, so a
        recorded pass never carries the pseudo-key.)"""
        keys, alphas, undo = p.keys, p.alphas, p.undo
        dense, beta = None, 0.0
        if MOMENTUM in keys:
            j = keys.index(MOMENTUM)
            beta = alphas[j]
            if undo is not None and undo[j] != 0.0:
                raise RuntimeError("internal: the momentum term cannot be part of a perturbation")
            keys, alphas = keys[:j] + keys[j + 1:], alphas[:j] + alphas[j + 1:]
            undo = None if undo is None else undo[:j] + undo[j + 1:]
            dense = [self._dense[t] for t in p.tids]
        if p.tensors:
            after = None
            if dense is not None and undo is not None and any(t.dim() < 2 for t in p.tensors):
                # The exact form takes no θ-shaped term: 1-D momenta follow in a plain pass (one rounding
                # more, on the small tensors only).
                vec = [i for i, t in enumerate(p.tensors) if t.dim() < 2]
                after = ([p.tensors[i] for i in vec], [dense[i] for i in vec], [p.tids[i] for i in vec],
                         None if p.offsets is None else [p.offsets[i] for i in vec])
                dense = [d if t.dim() >= 2 else None for t, d in zip(p.tensors, dense)]
            lowrank_noise_axpy_(p.tensors, keys, self._key_v, alphas, rank=self.rank, gamma=p.gamma, dense=dense,
                                beta=beta, rounding=p.rounding, tensor_ids=p.tids, offsets=p.offsets,
                                rounding_key=p.rounding_key, backend=self.backend, undo=undo, planes=p.planes)
            if after:       # ids and offsets: the stochastic-rounding bits of a shard are the whole tensor's
                ts, ds, ids, offs = after
                noise_axpy_(ts, [], [], dense=ds, beta=beta, rounding=p.rounding, tensor_ids=ids, offsets=offs,
                            rounding_key=mix_keys(p.rounding_key, 1), backend=self.backend)
        return {"key_v": self._key_v, "rank": self.rank}

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable] = None) -> float:
        if closure is None and self._closure_free_call():
            return None
        closure = self._require_closure(closure)
        t = self._t
        self._key_v = self.period_key(t)
        w = self._start_step()
        k = step_key(self.seed, t)
        theta = list(w.at)
        try:
            with self._failing_back(w, theta):
                lp, lm = self._sync_losses(*self._two_point(w, theta, k, closure))
                if not (math.isfinite(lp) and math.isfinite(lm)):
                    return self._failed_step(w, theta, {"loss+": lp, "loss-": lm})
                d = (lp - lm) / 2.0
                cs = [d / g["eps"] for g in self.param_groups]
                entries = [list(zip(ts, ids)) for ts, ids in zip(w.tensors, w.tids)]
                self._goto(w, [Point(self._decay(g["lr"], g["weight_decay"]), self._update_terms(g, e, k, c))
                               for g, e, c in zip(self.param_groups, entries, cs)], final=True)
                self._after_update(entries, k, cs)
                self._t += 1
                return (lp + lm) / 2.0
        finally:
            self._dense = {}

    def _update_terms(self, group: dict, entries, k: int, c: float) -> List[tuple]:
        """The noise terms of θ_{t+1} = γθ_t + Σ terms (LOZO: −ηc Z_t)."""
        return [(k, -group["lr"] * c)]

    def _after_update(self, layout, k: int, cs: List[float]) -> None:
        """Hook after the update pass (LOZO-M: store the new momentum)."""

    def _options(self) -> dict:
        return {**super()._options(), "rank": self.rank, "nu": self.nu}

    # ----------------------------------------------------------------- state
    def _zo_state(self) -> dict:
        return dict(super()._zo_state(), rank=self.rank, nu=self.nu)

    def load_state_dict(self, state_dict: dict) -> None:
        zo = state_dict.get("zo", {})
        for name in ("rank", "nu"):
            if name in zo and zo[name] != getattr(self, name):
                raise ValueError(f"state_dict has {name}={zo[name]} but this optimizer has {name}={getattr(self, name)}")
        super().load_state_dict(state_dict)


class LOZOM(LOZO):
    """LOZO-M: LOZO with momentum in the U-space (m×r per matrix); see the module docstring.

    Args: as LOZO, plus beta (the momentum coefficient β in [0, 1), default 0.9).  record=True is
    refused (the momentum is tensor state: resume with state_dict, which holds it).  FSDP2-sharded
    (DTensor) parameters keep the momentum rows of their shard (see the module docstring).
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, rank: int = 2, nu: int = 50, weight_decay: float = 0.0,
                 seed: int = 0, beta: float = 0.9, **kw):
        if kw.get("record"):
            raise ValueError("LOZOM keeps its momentum as tensor state, which a trajectory log cannot replay; "
                             "use state_dict to resume (record/replay works with LOZO)")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta!r} (must be in [0, 1))")
        self.beta = float(beta)
        self._m_period: Optional[int] = None    # the period (t // nu) whose V the stored momenta live in
        super().__init__(params, lr, eps=eps, rank=rank, nu=nu, weight_decay=weight_decay, seed=seed, **kw)

    def _factor(self, key: int, tid: int, count: int, offset: int, stream: int, device) -> torch.Tensor:
        """U or V (flat fp32) of one tensor, from the backend the passes use: the same numbers."""
        return noise_(torch.empty(count, dtype=torch.float32, device=device), key, tid, offset, stream=stream,
                      backend=self.backend)

    def _state_layout(self, p: torch.Tensor) -> dict:
        """The tensor state kept for p (what load_state_dict accepts): float32 momentum, rows x r for a
        matrix (its U-space), p's shape otherwise (as _after_update stores it)."""
        return {"momentum": ((p.shape[0], self.rank) if p.dim() >= 2 else tuple(p.shape), torch.float32)}

    def _carried(self, p: torch.Tensor, tid: int) -> torch.Tensor:
        """The stored momentum (this rank's rows), carried onto the current V: M V_oldᵀ V_new / n at a
        period change.  p: the parameter (a DTensor's global shape gives n)."""
        m = local_state(self.state[p]["momentum"])
        if p.dim() < 2 or self._m_period == self._t // self.nu:
            return m
        n, r = cols_of(p.shape), self.rank
        local, _ = _zdist.local_shard(p)
        v_old = self._factor(step_key(self.seed, self.nu * self._m_period), tid, n * r, 0, V_STREAM, local.device)
        v_new = self._factor(self._key_v, tid, n * r, 0, V_STREAM, local.device)
        proj = v_old.view(n, r).t() @ v_new.view(n, r) / n
        return m @ proj

    def _update_terms(self, group: dict, entries, k: int, c: float) -> List[tuple]:
        lr, beta = group["lr"], self.beta
        if self._m_period is None:                      # the first step: M = c U
            return [(k, -lr * c)]
        for p, tid in entries:
            self._dense[tid] = self._carried(p, tid)
        return [(k, -lr * (1.0 - beta) * c), (MOMENTUM, -lr * beta)]

    def _after_update(self, layout, k: int, cs: List[float]) -> None:
        first = self._m_period is None
        for entries, c in zip(layout, cs):
            for p, tid in entries:
                local, off = _zdist.local_shard(p)      # plain p: (p, 0); a dim-0 shard: its rows
                if p.dim() >= 2:
                    rows, r = local.shape[0], self.rank
                    row0 = off // cols_of(p.shape)
                    u = self._factor(k, tid, rows * r, row0 * r, U_STREAM, local.device).view(rows, r)
                    shape = (p.shape[0], r)
                else:
                    u = self._factor(k, tid, local.numel(), off, 0, local.device).view(local.shape)
                    shape = None
                new = c * u if first else self.beta * self._dense[tid] + (1.0 - self.beta) * c * u
                self.state[p]["momentum"] = shard_like(p, new, shape)
        self._m_period = self._t // self.nu

    def _options(self) -> dict:
        return {**super()._options(), "beta": self.beta}

    def _zo_state(self) -> dict:
        return dict(super()._zo_state(), beta=self.beta, momentum_period=self._m_period)

    def _load_zo_state(self, zo: dict) -> None:
        super()._load_zo_state(zo)
        self._m_period = zo.get("momentum_period")
