"""Triton kernel of the fused ZO-Adam pass (zo_kernels.adam; docs/spec.md §8): θ, m, v of every tensor in
one launch.

    g = Σ_j c_j·z(k_j, t) + λ₂θ;  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← γθ − s·m/(√v/√b₂ + ε)

Same launch layout as noise_axpy.py (helpers.py; a persistent grid walks an int64 table; each thread owns whole
quads, so one Philox call feeds four elements, and loads/stores are vectorised on the aligned path);
z comes from the same helpers, so this kernel and noise_axpy_ see the same noise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .helpers import (
    _TL,
    DTYPES,
    INTERPRET,
    _aligned,
    _coef,
    _column_extent,
    _column_ptr,
    _config,
    _noise,
    _round_store,
    _walk_quads,
    compile_ptx,
    f64_bits,
    fp_fusion,
)

__all__ = ["DTYPES", "noise_adam"]

# Table: six columns T long (param ptr, m ptr, v ptr, numel, tensor id, element offset), then K keys,
# K coefficients (float64 bits), the rounding key.
_COLS = tl.constexpr(6)


@triton.jit
def _adam_tile(idx, mask, gq, lq, p, mp, vp, tid, tab, T, b1, omb1, b2, omb2, eps, step_size, bc2_sqrt, l2, gamma,
               K: tl.constexpr, SR: tl.constexpr, OUT: tl.constexpr, FAST: tl.constexpr, RADEMACHER: tl.constexpr):
    if RADEMACHER:
        stream = 5  # the streams of docs/spec.md §1 / §9 (zo_kernels.noise.default_stream)
    else:
        stream = 0
    g = tl.zeros(idx.shape, tl.float32)
    for j in tl.static_range(K):
        g += _coef(tab + _COLS * T + K + j) * _noise(tl.load(tab + _COLS * T + j), gq, tid, stream, FAST, RADEMACHER)
    theta = tl.load(p + idx, mask=mask).to(tl.float32)
    m = tl.load(mp + idx, mask=mask)
    v = tl.load(vp + idx, mask=mask)
    g = g + l2 * theta
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * (g * g)
    # IEEE sqrt and division (Triton's defaults are approximate), as csrc/adam.h.
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps
    theta = gamma * theta - step_size * tl.math.div_rn(m, denom)
    tl.store(mp + idx, m, mask=mask)
    tl.store(vp + idx, v, mask=mask)
    _round_store(p, idx, mask, theta, tab + _COLS * T + 2 * K, gq, tid, SR, OUT)


@triton.jit
def _noise_adam_kernel(tab, T, b1, omb1, b2, omb2, eps, step_size, bc2_sqrt, l2, gamma,
                       K: tl.constexpr, SR: tl.constexpr, OUT: tl.constexpr, ALIGNED: tl.constexpr,
                       FAST: tl.constexpr, BLOCK: tl.constexpr, RADEMACHER: tl.constexpr = False):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for t in range(T):
        p = _column_ptr(tab, 0, T, t, OUT, ALIGNED)
        mp = _column_ptr(tab, 1, T, t, tl.float32, ALIGNED)
        vp = _column_ptr(tab, 2, T, t, tl.float32, ALIGNED)
        n, tid, off = _column_extent(tab, 3, T, t)
        _walk_quads(_adam_tile, (p, mp, vp, tid, tab, T, b1, omb1, b2, omb2, eps, step_size, bc2_sqrt, l2, gamma),
                    (K, SR, OUT, FAST, RADEMACHER), n, off, t % nprog == pid, pid, nprog, ALIGNED, BLOCK)


def noise_adam(params, exp_avgs, exp_avg_sqs, keys, coeffs, scalars, rounding, tensor_ids, offsets, rounding_key,
               noise="gaussian", block=None):
    groups = {}
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault(p.dtype, []).append(i)
    sc = scalars
    for dtype, idx in groups.items():
        ps, ms, vs = ([lst[i] for i in idx] for lst in (params, exp_avgs, exp_avg_sqs))
        offs = [offsets[i] for i in idx]
        table = ([t.data_ptr() for t in ps + ms + vs] + [p.numel() for p in ps] + [tensor_ids[i] for i in idx] +
                 offs + list(keys) + f64_bits(coeffs) + [rounding_key])
        device = ps[0].device
        tab = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        default_block, warps, max_prog = _config(device)
        BLOCK = block or default_block
        quads = sum((p.numel() + 3) // 4 + 1 for p in ps)
        grid = (max(1, min(max_prog, triton.cdiv(quads, BLOCK))),)
        _noise_adam_kernel[grid](
            tab, len(ps), sc.beta1, 1.0 - sc.beta1, sc.beta2, 1.0 - sc.beta2, sc.eps, sc.step_size, sc.bc2_sqrt,
            sc.l2, sc.gamma, K=len(keys), SR=rounding == "stochastic" and dtype != torch.float32, OUT=_TL[dtype],
            ALIGNED=_aligned(ps + ms + vs, offs), FAST=not INTERPRET, BLOCK=BLOCK, num_warps=warps,
            RADEMACHER=noise == "rademacher", enable_fp_fusion=fp_fusion(noise == "rademacher"))
        del tab  # freed to the caching allocator; its reuse is ordered after the launch on this stream


# ------------------------------------------------------------ ahead of time
AOT_CASES = [
    ("adam_k2_fp32", dict(K=2, SR=False, OUT="float32")),
    ("adam_k1_bf16_sr", dict(K=1, SR=True, OUT="bfloat16")),
    ("adam_k1_fp32_unaligned", dict(K=1, SR=False, OUT="float32", ALIGNED=False)),
    ("adam_rad_k2_bf16_sr", dict(K=2, SR=True, OUT="bfloat16", RADEMACHER=True)),
]


_AOT_SIGNATURE = {"tab": "*i64", "T": "i32",
                  **{n: "fp32" for n in ("b1", "omb1", "b2", "omb2", "eps", "step_size", "bc2_sqrt", "l2", "gamma")}}


def aot_ptx(cc: int, block: int = 256, num_warps: int = 4, **const) -> str:
    """PTX of the kernel for sm_<cc> without a GPU (helpers.compile_ptx)."""
    const = dict(dict(ALIGNED=True, FAST=True, BLOCK=block, RADEMACHER=False), **const)
    return compile_ptx(_noise_adam_kernel, cc, _AOT_SIGNATURE, const, num_warps=num_warps)
