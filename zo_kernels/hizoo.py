"""HiZOO's update pass (docs/spec.md §10, "A pass that writes σ"): the curvature update and the parameter
update in one pass over θ and σ = h^(-1/2), z regenerated from its key.

    hizoo_update_(params, sigmas, key, coeff=, gamma=, smoothing=a, curvature=c)
        for every element of every tensor t, z = z(key, t) in float32:
            f  = (1 − a) + (a·c)·(z·z)
            σ  ← σ / √f                          h ← (1 − a)·h + a·c·h·z²  with h = σ⁻²
            θ  ← round(γ·θ + coeff·(σ·z))         σ the new one: the authors update h first

σ may be stored in bfloat16 (half the memory; the arithmetic is float32 all the same): σ is widened
exactly, updated in float32 as above, and rounded back to bfloat16 *stochastically* (docs/spec.md §3's bf16
rule) with the stream-2 words of sigma_key = mix_keys(SIGMA_TAG, key, rounding_key); θ is then updated with
σ as stored, the σ the next step's perturbations read.  Why stochastic: a step changes σ by a factor
1/√f ≈ 1 − a·(c·z² − 1)/2, with a = 1e-8 (the default smoothing) about 1e-7 of σ or less, far below half a
bf16 step (2^-9 of σ): round-to-nearest would give σ back unchanged every step (h frozen at 1, MeZO), while
stochastic rounding keeps the stored σ's expectation equal to the float32 update, so the curvature
accumulates on average.  The key mixes the step's noise key, so each step draws fresh rounding bits.

z comes from `noise_` on the chosen backend, a chunk of CHUNK elements at a time (never a weight-sized
z); θ and σ are each read and written once.  The arithmetic is float32 torch on each chunk -- this module
is the pass on every backend (no native kernel: a fused one is future work, see docs/hizoo.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from .noise import DROPPED_BITS, mix_keys, random_words, stochastic_round
from .ops import noise_, noise_axpy_
from .rounding import check_rounding
from .validate import (
    check_key,
    check_no_overlap,
    check_noise,
    check_placement,
    check_scalar,
    check_tensor_list,
    check_tensors,
    named_tensors,
)

CHUNK = 1 << 16     # elements of z per noise_ call: 256 KiB of float32 scratch, cache-sized
SIGMA_DTYPES = (torch.float32, torch.bfloat16)
SIGMA_TAG = 0x5349474D41     # "SIGMA": the stochastic rounding of a bfloat16 σ (module doc)


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

    params: float32/bf16/fp16 tensors; sigmas: float32 or bfloat16, one per param, shaped like it (written; a
    bfloat16 σ is rounded stochastically, module doc);
    curvature c >= 0 (HiZOO: |l+ + l− − 2·l0| / (2μ²)); smoothing a in [0, 1); the rest as noise_axpy_."""
    params, _ = check_tensors(params)
    sigmas = check_tensor_list(sigmas, "sigmas", params[0].device, n=len(params))
    for i, (s, p) in enumerate(zip(sigmas, params)):
        if s.dtype not in SIGMA_DTYPES or s.shape != p.shape:
            raise ValueError(f"sigmas[{i}] must be float32 or bfloat16 of shape {tuple(p.shape)}, got {s.dtype} "
                             f"{tuple(s.shape)}")
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
    tensor_ids, offsets = check_placement(tensor_ids, offsets, n)
    rounding_key = 0 if rounding_key is None else check_key(rounding_key, "rounding_key")
    sigma_key = mix_keys(SIGMA_TAG, key, rounding_key)
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
                sig = _update_sigma(flat_s[a0:a0 + m], torch.sqrt(keep + ac * (z * z)), sigma_key, tid, off + a0,
                                    backend)
                acc = flat_p[a0:a0 + m].float() * gamma + coeff * (sig * z)
                if rounding == "stochastic" and p.dtype in DROPPED_BITS:
                    words = random_words(rounding_key, tid, m, offset=off + a0, device=p.device)
                    flat_p[a0:a0 + m] = stochastic_round(acc, p.dtype, words)
                else:
                    flat_p[a0:a0 + m] = acc.to(p.dtype)


def _update_sigma(sig: torch.Tensor, root_f: torch.Tensor, sigma_key: int, tid: int, offset: int,
                  backend: Optional[str]) -> torch.Tensor:
    """σ ← σ/√f in place (float32; a bfloat16 σ widened, then rounded back stochastically); returns σ as stored,
    in float32."""
    if sig.dtype == torch.float32:
        return sig.div_(root_f)
    # The rounding runs in the op on σ + (σ/√f − σ), whose stochastic rounding draws the bits of
    # random_words(sigma_key, tid, ...) at native speed (the torch Philox made a bfloat16-σ step ~5x slower
    # than a float32 one).  The sum is σ/√f exactly while √f <= 2 (Sterbenz), within a float32 ulp beyond.
    old = sig.float()
    delta = old.div(root_f).sub_(old)
    noise_axpy_([sig], [], [], gamma=1.0, dense=[delta], beta=1.0, rounding="stochastic", tensor_ids=[tid],
                offsets=[offset], rounding_key=sigma_key, backend=backend)
    return sig.float()


def curvature(l0: float, lp: float, lm: float, mu: float) -> float:
    """HiZOO's curvature scalar |l+ + l− − 2·l0| / (2μ²): h·z²·c estimates the diagonal Hessian."""
    return abs(lp + lm - 2.0 * l0) / (2.0 * mu * mu)
