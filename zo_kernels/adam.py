"""The fused ZO-Adam pass: custom op `zo_kernels::noise_adam_`, its validation and its reference
(docs/spec.md §8).

For every tensor t of the list, in fp32 registers (float64 for float64 tensors, reference only):

    g   = Σ_j coeffs[j]·z(keys[j], t) + λ₂·θ           z regenerated from the key, never stored
    m   ← β₁·m + (1 − β₁)·g
    v   ← β₂·v + (1 − β₂)·g²
    θ   ← γ·θ − s·m / (√v / √b₂ + ε)                    one rounding to θ's dtype

with the step-k scalars s = η / (1 − β₁ᵏ), b₂ = 1 − β₂ᵏ, and weight decay λ either coupled
(λ₂ = λ, γ = 1: torch.optim.Adam's L2 term) or decoupled (λ₂ = 0, γ = 1 − ηλ: AdamW).  This is
torch.optim.Adam's update with the gradient g = c·z of a ZO estimate: ZO-Bench's ZO-Adam writes
`param.grad = c·z` into a weight-sized tensor and calls the torch optimizer; here the pass reads
θ, m, v once and writes them once, and no z or gradient tensor exists.

With noise="rademacher" z is the sign vector s = ±1 of docs/spec.md §9 (g = Σ_j c_j·s_j).

m and v are float32 (float64 beside float64 parameters, on the reference).  Every backend
computes the same sequence of IEEE operations (no fused multiply-add), so results differ only
through z (each backend's z is within the spec's tolerance of the float64 one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from . import backends as _backends
from .noise import DROPPED_BITS, noise_values, random_words, stochastic_round
from .rounding import check_rounding, default_rounding_key
from .validate import (
    check_key,
    check_no_overlap,
    check_noise,
    check_params,
    check_placement,
    check_scalar,
    named_tensors,
)


@dataclass(frozen=True)
class AdamScalars:
    """The per-call scalars of the pass (Python floats; the fp32 kernels round each once)."""
    beta1: float
    beta2: float
    eps: float
    step_size: float      # s = lr / (1 − β₁ᵏ)
    bc2_sqrt: float       # √(1 − β₂ᵏ)
    l2: float             # coupled weight decay, added to g
    gamma: float          # decoupled weight decay factor on θ

    @classmethod
    def make(cls, lr: float, beta1: float, beta2: float, eps: float, step: int, weight_decay: float = 0.0,
             decoupled: bool = False) -> "AdamScalars":
        return cls(beta1=beta1, beta2=beta2, eps=eps, step_size=lr / (1.0 - beta1 ** step),
                   bc2_sqrt=math.sqrt(1.0 - beta2 ** step), l2=0.0 if decoupled else weight_decay,
                   gamma=1.0 - lr * weight_decay if decoupled else 1.0)

    def as_list(self) -> List[float]:
        return [self.beta1, self.beta2, self.eps, self.step_size, self.bc2_sqrt, self.l2, self.gamma]


@torch.library.custom_op("zo_kernels::noise_adam_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _noise_adam_op(params: List[torch.Tensor], exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor],
                   keys: List[int], coeffs: List[float], scalars: List[float], rounding: str,
                   tensor_ids: List[int], offsets: List[int], rounding_key: int, noise: str, backend: str) -> None:
    # any shared byte between θ, m and v (by byte range; real tensors here, also under torch.compile)
    check_no_overlap(named_tensors(params, written=[("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]))
    _backends.require_noise(_backends.get(backend), noise)
    _backends.get(backend).adam(params, exp_avgs, exp_avg_sqs, list(keys), list(coeffs), AdamScalars(*scalars),
                                rounding, list(tensor_ids), list(offsets), rounding_key, noise)
    _backends._set_last(backend)


@_noise_adam_op.register_fake
def _(params, exp_avgs, exp_avg_sqs, keys, coeffs, scalars, rounding, tensor_ids, offsets, rounding_key, noise,
      backend):
    return None


# ------------------------------------------------------------------ validation
def _check_states(states, params, name: str) -> list:
    if isinstance(states, torch.Tensor):
        states = [states]
    states = list(states)
    if len(states) != len(params):
        raise ValueError(f"{name} has {len(states)} tensors for {len(params)} params")
    for i, (s, p) in enumerate(zip(states, params)):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(s).__name__}")
        want = torch.float64 if p.dtype == torch.float64 else torch.float32
        if s.dtype != want:
            raise TypeError(f"{name}[{i}] has dtype {s.dtype}; Adam states are {want} for {p.dtype} params")
        if s.device != p.device:
            raise ValueError(f"{name}[{i}] is on {s.device} but params[{i}] is on {p.device}")
        if s.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(s.shape)} but params[{i}] has {tuple(p.shape)}")
        if not s.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous")
        if s.requires_grad:
            raise ValueError(f"{name}[{i}] requires grad; Adam states are plain buffers")
    return states


def _check_unaliased(*lists) -> None:
    seen = {}
    for name, ts in lists:
        for i, t in enumerate(ts):
            if t.numel():
                ptr = t.data_ptr()
                if ptr in seen:
                    raise ValueError(f"{name}[{i}] and {seen[ptr]} share memory; params, exp_avgs and "
                                     f"exp_avg_sqs must be distinct tensors")
                seen[ptr] = f"{name}[{i}]"


def _check_range(x, name: str, lo: float, hi: float, lo_open=False, hi_open=True) -> float:
    x = check_scalar(x, name)
    if (x < lo or (lo_open and x == lo)) or (x > hi or (hi_open and x == hi)):
        raise ValueError(f"{name}={x} is outside {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
    return x


# ----------------------------------------------------------------- public API
def noise_adam_(params, exp_avgs, exp_avg_sqs, keys, coeffs, *, lr: float, step: int,
                betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False,
                rounding: str = "nearest", tensor_ids=None, offsets=None, rounding_key=None,
                backend: Optional[str] = None, noise: str = "gaussian") -> None:
    """One fused Adam step with the gradient g_t = Σ_j coeffs[j]·z(keys[j], t), in place (see module doc).

    params       contiguous floating tensors on one device (fp32, bf16, fp16; fp64 via the reference)
    exp_avgs     m, one float32 tensor per param (float64 for float64 params)
    exp_avg_sqs  v, likewise
    step         k ≥ 1, the Adam step count this update makes (bias corrections 1 − βᵏ)
    decoupled    weight decay as AdamW (θ ← (1 − ηλ)θ − ...) instead of Adam's L2 term in g
    rounding, tensor_ids, offsets, rounding_key, backend: as noise_axpy_ (θ's rounding only;
                 m and v are fp32 and round to nearest)
    noise        "gaussian" (z) or "rademacher" (g = Σ_j c_j·s_j with signs s = ±1, docs/spec.md §9)
    """
    params = check_params(params)
    exp_avgs = _check_states(exp_avgs, params, "exp_avgs")
    exp_avg_sqs = _check_states(exp_avg_sqs, params, "exp_avg_sqs")
    _check_unaliased(("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs))
    if isinstance(keys, int):
        keys = [keys]
    if isinstance(coeffs, (int, float)):
        coeffs = [coeffs]
    keys = [check_key(k, f"keys[{j}]") for j, k in enumerate(keys)]
    coeffs = [check_scalar(c, f"coeffs[{j}]") for j, c in enumerate(coeffs)]
    if len(keys) != len(coeffs):
        raise ValueError(f"len(keys)={len(keys)} but len(coeffs)={len(coeffs)}: one coefficient per key")
    if not keys:
        raise ValueError("keys is empty: the ZO gradient needs at least one direction")
    lr = _check_range(lr, "lr", 0.0, math.inf)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = _check_range(betas[0], "betas[0]", 0.0, 1.0)
    b2 = _check_range(betas[1], "betas[1]", 0.0, 1.0)
    eps = _check_range(eps, "eps", 0.0, math.inf, lo_open=True)
    weight_decay = _check_range(weight_decay, "weight_decay", 0.0, math.inf)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the step this update makes), got {step!r}")
    if not isinstance(decoupled, bool):
        raise TypeError(f"decoupled must be a bool, got {type(decoupled).__name__}")
    if decoupled and lr * weight_decay >= 1.0:
        raise ValueError(f"lr * weight_decay = {lr * weight_decay} must be < 1 with decoupled weight decay")
    check_rounding(rounding)
    check_noise(noise)
    n = len(params)
    tensor_ids, offsets = check_placement(tensor_ids, offsets, n)
    sc = AdamScalars.make(lr, b1, b2, eps, step, weight_decay, decoupled)
    if rounding_key is None:
        rounding_key = default_rounding_key(keys, coeffs, sc.gamma, sc.step_size)
    rounding_key = check_key(rounding_key, "rounding_key")
    chosen = _backends.choose(params, backend)
    _backends.require(chosen, "adam", "has no fused Adam pass")
    with torch.no_grad():
        _noise_adam_op(params, exp_avgs, exp_avg_sqs, keys, coeffs, sc.as_list(), rounding, tensor_ids, offsets,
                       rounding_key, noise, chosen.name)


# ------------------------------------------------------------------- reference
def adam_update(theta, m, v, g, sc: AdamScalars):
    """The update of the module doc on tensors of one working dtype; returns (θ', m', v').

    One IEEE operation per step and in the kernels' order (no addcmul/lerp, which round differently)."""
    g = g + sc.l2 * theta
    m = sc.beta1 * m + (1.0 - sc.beta1) * g
    v = sc.beta2 * v + (1.0 - sc.beta2) * (g * g)
    denom = torch.sqrt(v) / sc.bc2_sqrt + sc.eps
    theta = sc.gamma * theta - sc.step_size * (m / denom)
    return theta, m, v


def noise_adam_reference(params, exp_avgs, exp_avg_sqs, keys, coeffs, sc: AdamScalars, rounding, tensor_ids,
                         offsets, rounding_key, noise="gaussian"):
    """The pass in plain PyTorch: fp32 math for fp32/bf16/fp16 params, float64 for float64 (the oracle);
    g = Σ_j c_j·z_j with z of the noise form `noise` (docs/spec.md §9)."""
    for i, p in enumerate(params):
        n, tid, off = p.numel(), tensor_ids[i], offsets[i]
        if n == 0:
            continue
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = torch.zeros(n, dtype=work, device=p.device)
        for key, c in zip(keys, coeffs):
            g = g + c * noise_values(noise, key, tid, n, offset=off, dtype=work, device=p.device)
        theta, m, v = adam_update(p.reshape(-1).to(work), exp_avgs[i].reshape(-1), exp_avg_sqs[i].reshape(-1), g, sc)
        if rounding == "stochastic" and p.dtype in DROPPED_BITS:
            out = stochastic_round(theta, p.dtype, random_words(rounding_key, tid, n, offset=off, device=p.device))
        else:
            out = theta.to(p.dtype)
        exp_avgs[i].copy_(m.view_as(exp_avgs[i]))
        exp_avg_sqs[i].copy_(v.view_as(exp_avg_sqs[i]))
        p.copy_(out.view_as(p))
