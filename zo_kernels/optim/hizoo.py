"""HiZOO (Zhao et al., ICLR 2025, "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed
Zeroth-Order Optimizer"): a diagonal curvature estimate h shapes the perturbation, μ·z/√h.

Step t, per group (μ = eps, η = lr, λ = weight_decay, a = the smoothing of step t, z = z(step_key(seed, t)),
σ = h^(-1/2) elementwise, h = 1 at the start):

    l0 = f(θ),   l+ = f(θ + μ σ⊙z),   l− = f(θ − μ σ⊙z)        three forwards; scaled passes (docs/spec.md §10)
    c  = |l+ + l− − 2·l0| / (2μ²)
    h  ← (1 − a)·h + a·c·h⊙z²                                    i.e. σ ← σ / √((1 − a) + a·c·z²)
    θ  ← (1 − ηλ)·θ − η·((l+ − l−)/(2μ))·z/√h                    with the NEW h, as the authors do

which is the authors' zo_Hessian_step_update (Yanjun-Zhao/HiZOO, trainer.py) in their order: the two
perturbations and the restore use the old h; h is updated first, then θ with the new h.  Here the state is
σ = h^(-1/2) (one tensor per parameter: `opt.state[p]["sigma"]`, float32, or bfloat16 with
sigma_dtype=torch.bfloat16: half the memory, rounded stochastically after each update, zo_kernels.hizoo's
module doc says how and why), so the perturbation passes take
σ as the scaled form's `scale` with no temporary, and the update is zo_kernels.hizoo.hizoo_update_: one pass
that regenerates z and writes σ and θ.  The restore before it is a scaled pass of its own (exact restore
for bf16/fp16 as every optimizer's), so per step θ is touched 4 times (+μσz, −2μσz, restore, update) and σ
read 4 times and written once.

The smoothing a: a number, or the name of one of the authors' schedules (SMOOTHING_SCHEDULES; their
default "constant0" is MeZO, their example uses "constant1e-8"); a schedule is evaluated at every step
(the authors evaluate it once per epoch, at the epoch's first step).  The authors' code also runs a fourth
forward after the update to report its loss; step() returns l0 instead (3 queries per step).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from ..hizoo import SIGMA_DTYPES, check_smoothing, curvature, hizoo_update_
from ..noise import M64, mix_keys, step_key
from ..ops import noise_axpy_
from .noise_form import noise_kw
from .points import Tracked, origin
from .sharded_state import local_state, zeros_state
from .spsa import SPSAOptimizer

_HIZOO_TAG = 0x48495A4F  # "HIZO": rounding keys of the update pass


def _constant(a: float) -> Callable[[int], float]:
    return lambda t: a


# The authors' Hessian_smooth_scheduler entries that are defined (their constant_with_warmup reads an
# undefined name): step -> a.
SMOOTHING_SCHEDULES = {
    "constant0": _constant(0.0), "constant1e-2": _constant(1e-2), "constant1e-4": _constant(1e-4),
    "constant1e-6": _constant(1e-6), "constant1e-8": _constant(1e-8), "constant1e-10": _constant(1e-10),
    "constant1e-12": _constant(1e-12), "constant_decay1": lambda t: 1e-6 if t < 9800 else 1e-8,
}


def check_sigma_dtype(dtype) -> torch.dtype:
    """σ's storage dtype: torch.float32 or torch.bfloat16 (or their names)."""
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if named not in SIGMA_DTYPES:
        raise ValueError(f"sigma_dtype must be one of {[str(d) for d in SIGMA_DTYPES]} (or its name), got {dtype!r}")
    return named


def check_schedule(smoothing) -> Union[float, str]:
    if isinstance(smoothing, str):
        if smoothing not in SMOOTHING_SCHEDULES:
            raise ValueError(f"smoothing schedule {smoothing!r} is not one of {sorted(SMOOTHING_SCHEDULES)}")
        return smoothing
    return check_smoothing(smoothing)


class HiZOO(SPSAOptimizer):
    """HiZOO: `loss = opt.step(closure)` (returns l0, the loss at θ_t).

    Args: lr η, eps μ, weight_decay λ, seed, smoothing (a in [0, 1) or a schedule name, module doc),
    sigma_dtype (σ's storage: torch.float32, or torch.bfloat16 to halve HiZOO's extra memory; the arithmetic is
    float32 either way, and a bfloat16 σ is rounded back stochastically after each update, see
    zo_kernels.hizoo), noise, and the core options of every ZO optimizer.  One direction per step; no layer sampling (σ of every
    tensor changes every step).
    """

    _samples_layers = False
    # replay() re-issues its trajectory (σ rebuilt by the update passes); the seed-log format has no σ.
    unloggable = "HiZOO's scaled passes and σ updates are not in the seed-log format (docs/seedlog.md)"

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, *,
                 smoothing: Union[float, str] = 1e-8, sigma_dtype: torch.dtype = torch.float32, **core):
        if core.get("n_directions", 1) != 1:
            raise ValueError(f"HiZOO takes one direction per step, got n_directions={core['n_directions']!r}")
        self.smoothing = check_schedule(smoothing)
        self.sigma_dtype = check_sigma_dtype(sigma_dtype)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), seed=seed, **core)
        self._scales: dict = {}

    @property
    def queries_per_step(self) -> int:
        return 3

    def smoothing_at(self, t: int) -> float:
        """a of step t."""
        s = self.smoothing
        return SMOOTHING_SCHEDULES[s](t) if isinstance(s, str) else s

    # ----------------------------------------------------------------- state
    def _state_layout(self, p: torch.Tensor) -> dict:
        return {"sigma": (tuple(p.shape), self.sigma_dtype)}

    def _sigma(self, p: torch.Tensor) -> torch.Tensor:
        """σ of p (its local shard under FSDP2), created at 1 (h = 1, the authors' start)."""
        st = self.state[p]
        if "sigma" not in st:
            st["sigma"] = zeros_state(p, dtype=self.sigma_dtype)
            local_state(st["sigma"]).fill_(1.0)
        return local_state(st["sigma"])

    def _snapshot_extra(self):
        return tuple(self._sigma(p) for g in self.param_groups for p in g["params"] if p.requires_grad)

    # -------------------------------------------------------------- the step
    def step(self, closure: Optional[Callable] = None) -> float:
        if closure is None and self._closure_free_call():
            return None
        closure = self._require_closure(closure)
        w = self._start_step(self._step_layout(), extra=self._snapshot_extra())
        self._scales = {tid: self._sigma(p) for ts, ids in zip(w.tensors, w.tids) for p, tid in zip(ts, ids)}
        key = step_key(self.seed, self._t)
        entry = list(w.at)
        with self._failing_back(w, entry):
            l0 = self._closure_loss(closure)
            lp, lm = self._two_point(w, entry, key, closure)
            l0, lp, lm = self._sync_losses(l0, lp, lm)
            if not all(math.isfinite(x) for x in (l0, lp, lm)):
                return self._failed_step(w, entry, {"loss0": l0, "loss+": lp, "loss-": lm})
            self._hizoo_update(w, key, l0, lp, lm)
            self._t += 1
            return l0

    def _hizoo_update(self, w: Tracked, key: int, l0: float, lp: float, lm: float) -> None:
        self._goto(w, origin(len(w.at)))          # remove −μσz with the old σ (exact for bf16/fp16)
        a = self.smoothing_at(self._t)
        for g, ts, ids in zip(self.param_groups, w.tensors, w.tids):
            if not ts:
                continue
            self._call_idx += 1
            rkey = mix_keys(_HIZOO_TAG, step_key(self.seed, self._t), self._call_idx)
            loc = self._local_group(ts, ids)
            c = curvature(l0, lp, lm, g["eps"])
            coeff = -g["lr"] * (lp - lm) / (2.0 * g["eps"])
            gamma = self._decay(g["lr"], g["weight_decay"])
            if loc.shards:
                hizoo_update_(loc.shards, [self._scales[t] for t in loc.tids], key, coeff=coeff, gamma=gamma,
                              smoothing=a, curvature=c, rounding=self.rounding, tensor_ids=loc.tids,
                              offsets=loc.offsets, rounding_key=rkey, backend=self.backend, **noise_kw(self.noise))
                self._refresh(loc.params)
            if self.trajectory is not None:
                self.trajectory.append({"step": self._t, "hizoo": True, "keys": [key & M64], "coeff": coeff,
                                        "gamma": gamma, "smoothing": a, "curvature": c, "tensor_ids": list(ids),
                                        "rounding": self.rounding, "rounding_key": rkey & M64,
                                        **noise_kw(self.noise), **self._sigma_kw()})

    def _issue(self, p) -> dict:
        """Every pass on the weights is scaled by σ (the perturbations and the restore)."""
        if p.tensors:
            noise_axpy_(p.tensors, p.keys, p.alphas, gamma=p.gamma, rounding=p.rounding, tensor_ids=p.tids,
                        offsets=p.offsets, rounding_key=p.rounding_key, backend=self.backend, undo=p.undo,
                        planes=p.planes, scale=[self._scales[t] for t in p.tids], **noise_kw(self.noise))
        return {"scaled": True, **self._sigma_kw()}

    def _sigma_name(self) -> str:
        return str(self.sigma_dtype).split(".")[-1]

    def _sigma_kw(self) -> dict:
        """σ's dtype for the trajectory and state, named only when it is not float32 (older logs and
        state_dicts load unchanged)."""
        return {} if self.sigma_dtype == torch.float32 else {"sigma_dtype": self._sigma_name()}

    # ----------------------------------------------------------- state_dict
    def _options(self) -> dict:
        return {**super()._options(), "smoothing": self.smoothing, **self._sigma_kw()}

    def _zo_state(self) -> dict:
        return {**super()._zo_state(), "smoothing": self.smoothing, **self._sigma_kw()}

    def _load_zo_state(self, zo: dict) -> None:
        super()._load_zo_state(zo)
        for k, mine in (("smoothing", self.smoothing), ("sigma_dtype", self._sigma_name())):
            if zo.get(k, mine) != mine:
                raise ValueError(f"state_dict was saved with {k}={zo[k]!r}, this optimizer has {mine!r}")
