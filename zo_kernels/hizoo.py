"""HiZOO's update pass (docs/spec.md §10, "A pass that writes σ"): the curvature update and the parameter
update in one pass over θ and σ = h^(-1/2), z regenerated from its key.

    hizoo_update_(params, sigmas, key, coeff=, gamma=, smoothing=a, curvature=c)
        for every element of every tensor t, z = z(key, t) in float32:
            f  = (1 − a) + (a·c)·(z·z)
            σ  ← σ / √f                          h ← (1 − a)·h + a·c·h·z²  with h = σ⁻²
            θ  ← round(γ·θ + coeff·(σ·z))         σ the new one: the authors update h first

z comes from `noise_` on the chosen backend, a chunk of CHUNK elements at a time (never a weight-sized
z); θ and σ are each read and written once.  The arithmetic is float32 torch on each chunk -- this module
is the pass on every backend (no native kernel: a fused one is future work, see docs/hizoo.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from .noise import DROPPED_BITS, random_words, stochastic_round
from .ops import noise_
from .rounding import check_rounding
from .validate import (
    check_index_list,
    check_key,
    check_no_overlap,
    check_noise,
    check_scalar,
    check_tensor_list,
    check_tensors,
    named_tensors,
)

CHUNK = 1 << 16     # elements of z per noise_ call: 256 KiB of float32 scratch, cache-sized


def check_smoothing(a, name: str = "smoothing") -> float:
    """HiZOO's smoothing a in [0, 1): a = 1 would leave h = c·h·z², zero where z is."""
    a = check_scalar(a, name)
    if not 0.0 <= a < 1.0:
        raise ValueError(f"{name}={a} must be in [0, 1)")
    return a


def hizoo_update_(params, sigmas, key, *, coeff: float, gamma: float = 1.0, smoothing: float, curvature: float,
                  rounding: str = "nearest", tensor_ids=None, offsets=None, rounding_key: Optional[int] = None,
                  noise: str = "gaussian", backend: Optional[str] = None) -> None:
    """In place: σ ← σ/√((1 − a) + a·c·z²), then θ ← round(γθ + coeff·(σ ⊙ z)) (module doc).

    params: float32/bf16/fp16 tensors; sigmas: float32, one per param, shaped like it (written);
    curvature c >= 0 (HiZOO: |l+ + l− − 2·l0| / (2μ²)); smoothing a in [0, 1); the rest as noise_axpy_."""
    params, _ = check_tensors(params)
    sigmas = check_tensor_list(sigmas, "sigmas", params[0].device, n=len(params))
    for i, (s, p) in enumerate(zip(sigmas, params)):
        if s.dtype != torch.float32 or s.shape != p.shape:
            raise ValueError(f"sigmas[{i}] must be float32 of shape {tuple(p.shape)}, got {s.dtype} {tuple(s.shape)}")
    if any(p.dtype == torch.float64 for p in params):
        raise TypeError("hizoo_update_ computes in float32: float64 params are not supported")
    key = check_key(key, "key")
    coeff, gamma = check_scalar(coeff, "coeff"), check_scalar(gamma, "gamma")
    a = check_smoothing(smoothing)
    c = check_scalar(curvature, "curvature")
    if c < 0:
        raise ValueError(f"curvature={c} must be >= 0")
    check_rounding(rounding)
    check_noise(noise)
    n = len(params)
    tensor_ids = check_index_list(tensor_ids, n, "tensor_ids", range(n), 0, 1 << 32)
    offsets = check_index_list(offsets, n, "offsets", [0] * n, 0, 1 << 62)
    rounding_key = 0 if rounding_key is None else check_key(rounding_key, "rounding_key")
    check_no_overlap(named_tensors(params, written=[("sigmas", sigmas)]))
    keep = torch.tensor(1.0 - a, dtype=torch.float32)        # (1 − a) and a·c rounded to float32 once
    ac = torch.tensor(a * c, dtype=torch.float32)
    buf = torch.empty(min(CHUNK, max(p.numel() for p in params)), dtype=torch.float32, device=params[0].device)
    with torch.no_grad():
        for p, s, tid, off in zip(params, sigmas, tensor_ids, offsets):
            flat_p, flat_s = p.view(-1), s.view(-1)
            for a0 in range(0, p.numel(), CHUNK):
                m = min(CHUNK, p.numel() - a0)
                z = noise_(buf[:m], key, tid, off + a0, backend=backend, noise=noise)
                sig = flat_s[a0:a0 + m]
                sig.div_(torch.sqrt(keep + ac * (z * z)))
                acc = flat_p[a0:a0 + m].float() * gamma + coeff * (sig * z)
                if rounding == "stochastic" and p.dtype in DROPPED_BITS:
                    words = random_words(rounding_key, tid, m, offset=off + a0, device=p.device)
                    flat_p[a0:a0 + m] = stochastic_round(acc, p.dtype, words)
                else:
                    flat_p[a0:a0 + m] = acc.to(p.dtype)


def curvature(l0: float, lp: float, lm: float, mu: float) -> float:
    """HiZOO's curvature scalar |l+ + l− − 2·l0| / (2μ²): h·z²·c estimates the diagonal Hessian."""
    return abs(lp + lm - 2.0 * l0) / (2.0 * mu * mu)
