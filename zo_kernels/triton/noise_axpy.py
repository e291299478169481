"""Triton kernel of the primitive (docs/spec.md §2-§4): every tensor of a list in one launch, z regenerated
in registers.

    θ_t ← gamma·θ_t + Σ_j alphas[j]·z(keys[j], t) + beta·dense_t

(with the scaled form's σ, docs/spec.md §10, z_j is fl(σ_t·z_j) in both forms: σ read once per element in the
same pass.)
One launch per (param dtype, dense dtype) group covers all its tensors: the
host packs an int64 table (pointers, sizes, tensor ids, offsets, keys, alpha
bits) and a persistent grid walks it.  Each thread owns whole quads
([BLOCK, 4] tiles), so one Philox call feeds four elements and, when the
host has checked alignment, loads and stores are vectorised.  The reference
is zo_kernels.noise; the PyTorch transcription there defines the numbers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..noise import default_stream
from .helpers import (
    _TL,
    DTYPES,
    INTERPRET,
    _aligned,
    _coef,
    _column_extent,
    _column_ptr,
    _config,
    _invert_rounding,
    _noise,
    _round_store,
    _walk_quads,
    _write_plane,
    compile_ptx,
    f64_bits,
    fp_fusion,
)

__all__ = ["DTYPES", "noise_axpy", "noise_axpy_exact", "noise"]

_PLANE_TL = {2: tl.uint8, 4: tl.int16, 8: tl.int32}  # one word per quad: 4 residues of PBITS bits
# Table: six columns T long (param ptr, dense ptr, numel, tensor id, element offset, σ ptr: the param's own
# when unscaled, never read), then K keys, K alphas (float64 bits), the rounding key, and in exact mode K undo coefficients.  Keys ride in the table, so
# a launch never recompiles because a key's value changed Triton's argument type.
_COLS = tl.constexpr(6)


@triton.jit
def _sigma(sp, idx, mask, SCALED: tl.constexpr):
    """The scaled form's σ of the tile in float32 (read once, before the keys), or None when unscaled."""
    if SCALED:
        sv = tl.load(sp + idx, mask=mask).to(tl.float32)
    else:
        sv = None
    return sv


@triton.jit
def _key_noise(tab, T, j, gq, tid, stream, sv, SCALED: tl.constexpr, FAST: tl.constexpr,
               RADEMACHER: tl.constexpr):
    """z of key j, or fl(σ·z) when SCALED: its own rounding (§10), a product no FMA can absorb."""
    z = _noise(tl.load(tab + _COLS * T + j), gq, tid, stream, FAST, RADEMACHER)
    if SCALED:
        z = sv * z
    return z


@triton.jit
def _tile(p, dp, sp, idx, mask, gq, tid, tab, T, gamma, beta, stream,
          K: tl.constexpr, HAS_X: tl.constexpr, HAS_DENSE: tl.constexpr, SR: tl.constexpr,
          OUT: tl.constexpr, FAST: tl.constexpr, RADEMACHER: tl.constexpr, SCALED: tl.constexpr):
    if HAS_X:
        acc = tl.load(p + idx, mask=mask).to(tl.float32) * gamma
    else:
        acc = tl.zeros(idx.shape, tl.float32)
    sv = _sigma(sp, idx, mask, SCALED)
    for j in tl.static_range(K):
        acc += _coef(tab + _COLS * T + K + j) * _key_noise(tab, T, j, gq, tid, stream, sv, SCALED, FAST,
                                                           RADEMACHER)
    if HAS_DENSE:
        acc += beta * tl.load(dp + idx, mask=mask).to(tl.float32)
    _round_store(p, idx, mask, acc, tab + _COLS * T + 2 * K, gq, tid, SR, OUT)


@triton.jit
def _tile_exact(p, pp, sp, idx, mask, gq, qi, tid, tab, T, gamma, stream,
                K: tl.constexpr, SR: tl.constexpr, OUT: tl.constexpr, FAST: tl.constexpr,
                INVERT: tl.constexpr, PLANE: tl.constexpr, PBITS: tl.constexpr, RADEMACHER: tl.constexpr,
                SCALED: tl.constexpr):
    """zo_kernels.restore.noise_axpy_exact_reference in registers: undo the carried perturbation
    by inverting its rounding (plane-resolved), write or read the residue plane, apply the new one."""
    y = tl.load(p + idx, mask=mask)
    s_new = tl.zeros(idx.shape, tl.float32)
    s_undo = tl.zeros(idx.shape, tl.float32)
    sv = _sigma(sp, idx, mask, SCALED)
    for j in tl.static_range(K):
        z = _key_noise(tab, T, j, gq, tid, stream, sv, SCALED, FAST, RADEMACHER)
        s_new += _coef(tab + _COLS * T + K + j) * z
        s_undo += _coef(tab + _COLS * T + 2 * K + 1 + j) * z
    qmask = tl.max(mask.to(tl.int32), axis=1) > 0
    theta0 = y
    if INVERT:
        theta0 = _invert_rounding(y, s_undo, pp, qi, qmask, OUT, PLANE, PBITS)
    if PLANE == 1:
        _write_plane(pp, qi, qmask, theta0, mask, OUT, PBITS)
    _round_store(p, idx, mask, theta0.to(tl.float32) * gamma + s_new, tab + _COLS * T + 2 * K, gq, tid, SR, OUT)


@triton.jit
def _dispatch(idx, mask, gq, qi, p, dp, sp, tid, tab, T, gamma, beta, stream,
              K: tl.constexpr, HAS_X: tl.constexpr, HAS_DENSE: tl.constexpr, SR: tl.constexpr,
              OUT: tl.constexpr, FAST: tl.constexpr, EXACT: tl.constexpr, INVERT: tl.constexpr,
              PLANE: tl.constexpr, PBITS: tl.constexpr, RADEMACHER: tl.constexpr, SCALED: tl.constexpr):
    if EXACT:
        _tile_exact(p, dp, sp, idx, mask, gq, qi, tid, tab, T, gamma, stream, K, SR, OUT, FAST, INVERT, PLANE,
                    PBITS, RADEMACHER, SCALED)
    else:
        _tile(p, dp, sp, idx, mask, gq, tid, tab, T, gamma, beta, stream, K, HAS_X, HAS_DENSE, SR, OUT, FAST,
              RADEMACHER, SCALED)


@triton.jit
def _noise_axpy_kernel(tab, T, gamma, beta, stream,
                       K: tl.constexpr, HAS_X: tl.constexpr, HAS_DENSE: tl.constexpr, SR: tl.constexpr,
                       OUT: tl.constexpr, DENSE: tl.constexpr, ALIGNED: tl.constexpr, FAST: tl.constexpr,
                       BLOCK: tl.constexpr, EXACT: tl.constexpr = False, INVERT: tl.constexpr = False,
                       PLANE: tl.constexpr = 0, PBITS: tl.constexpr = 2, RADEMACHER: tl.constexpr = False,
                       SCALED: tl.constexpr = False, SDT: tl.constexpr = tl.float32):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for t in range(T):
        p = _column_ptr(tab, 0, T, t, OUT, ALIGNED)
        # Column 1 is the dense tensor, or in exact mode the residue plane (one word per quad).
        dp = _column_ptr(tab, 1, T, t, DENSE, ALIGNED)
        n, tid, off = _column_extent(tab, 2, T, t)
        sp = _column_ptr(tab, 5, T, t, SDT, ALIGNED)   # σ, indexed like θ (local index, not global)
        _walk_quads(_dispatch, (p, dp, sp, tid, tab, T, gamma, beta, stream),
                    (K, HAS_X, HAS_DENSE, SR, OUT, FAST, EXACT, INVERT, PLANE, PBITS, RADEMACHER, SCALED),
                    n, off, t % nprog == pid, pid, nprog, ALIGNED, BLOCK)



# ------------------------------------------------------------ ahead of time
# (name, constexprs); dtype names are resolved against triton.language.
AOT_CASES = [
    ("k1_fp32", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="float32", DENSE="float32")),
    ("k2_fp32_dense", dict(K=2, HAS_X=True, HAS_DENSE=True, SR=False, OUT="float32", DENSE="float32")),
    ("k4_bf16", dict(K=4, HAS_X=True, HAS_DENSE=False, SR=False, OUT="bfloat16", DENSE="bfloat16")),
    ("k2_bf16_dense_sr", dict(K=2, HAS_X=True, HAS_DENSE=True, SR=True, OUT="bfloat16", DENSE="float32")),
    ("k1_fp16_sr", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=True, OUT="float16", DENSE="float16")),
    ("noise_fp32", dict(K=1, HAS_X=False, HAS_DENSE=False, SR=False, OUT="float32", DENSE="float32")),
    ("k2_fp32_unaligned", dict(K=2, HAS_X=True, HAS_DENSE=True, SR=False, OUT="float32", DENSE="float32",
                               ALIGNED=False)),
    # Exact restore: write the residue plane on +μ; invert (plane-resolved) on the next pass.
    ("exact_bf16_write_plane2", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="bfloat16", DENSE="uint8",
                                     EXACT=True, PLANE=1, PBITS=2)),
    ("exact_bf16_invert_plane8", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="bfloat16", DENSE="int32",
                                      EXACT=True, INVERT=True, PLANE=2, PBITS=8)),
    ("exact_fp32_invert_noplane", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="float32", DENSE="float32",
                                       EXACT=True, INVERT=True)),
    ("k1_fp32_accurate_sincos", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="float32", DENSE="float32",
                                     FAST=False)),
    # The ±1 form (docs/spec.md §9): no sin/cos, no FMA contraction.
    ("rad_k2_fp32_dense", dict(K=2, HAS_X=True, HAS_DENSE=True, SR=False, OUT="float32", DENSE="float32",
                               RADEMACHER=True)),
    ("rad_k2_bf16_sr", dict(K=2, HAS_X=True, HAS_DENSE=False, SR=True, OUT="bfloat16", DENSE="bfloat16",
                            RADEMACHER=True)),
    ("rad_exact_fp16_invert_plane4", dict(K=2, HAS_X=True, HAS_DENSE=False, SR=False, OUT="float16", DENSE="int16",
                                          EXACT=True, INVERT=True, PLANE=2, PBITS=4, RADEMACHER=True)),
    # The scaled form (docs/spec.md §10): σ loaded once per tile, vectorised like θ.
    ("scaled_k2_bf16_sr", dict(K=2, HAS_X=True, HAS_DENSE=False, SR=True, OUT="bfloat16", DENSE="bfloat16",
                               SCALED=True, SDT="float32")),
    ("scaled_exact_bf16_invert_plane2", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="bfloat16",
                                             DENSE="uint8", EXACT=True, INVERT=True, PLANE=2, PBITS=2,
                                             SCALED=True, SDT="float32")),
    ("rad_scaled_k2_fp32_dense", dict(K=2, HAS_X=True, HAS_DENSE=True, SR=False, OUT="float32", DENSE="float32",
                                      RADEMACHER=True, SCALED=True, SDT="float32")),
    ("scaled_bf16sigma_exact_fp32_write_plane2", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="float32",
                                                      DENSE="uint8", EXACT=True, PLANE=1, PBITS=2, SCALED=True,
                                                      SDT="bfloat16")),
]


_AOT_SIGNATURE = {"tab": "*i64", "T": "i32", "gamma": "fp32", "beta": "fp32", "stream": "i32"}


def aot_ptx(cc: int, block: int = 256, num_warps: int = 4, **const) -> str:
    """PTX of the kernel for sm_<cc> without a GPU (helpers.compile_ptx; aot.py writes AOT_CASES)."""
    const = dict(dict(ALIGNED=True, FAST=True, BLOCK=block, EXACT=False, INVERT=False, PLANE=0, PBITS=2,
                      RADEMACHER=False, SCALED=False, SDT="float32"), **const)
    return compile_ptx(_noise_axpy_kernel, cc, _AOT_SIGNATURE, const, num_warps=num_warps)


# --------------------------------------------------------------------- host
def _launch(params, dense, keys, alphas, gamma, beta, rounding, tensor_ids, offsets, rounding_key,
            stream=0, has_x=True, block=None, undo=None, planes=None, plane_bits=2, noise="gaussian", scale=None):
    device = params[0].device
    T = len(params)
    dense_list = dense if dense is not None else params
    exact = undo is not None
    second = planes if planes else dense_list
    table = ([p.data_ptr() for p in params] + [d.data_ptr() for d in second] +
             [p.numel() for p in params] + list(tensor_ids) + list(offsets) +
             [s.data_ptr() for s in (scale or params)] + list(keys) + f64_bits(alphas) +
             [rounding_key] + (f64_bits(undo) if exact else []))
    tab = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
    default_block, warps, max_prog = _config(device)
    BLOCK = block or default_block
    quads = sum((p.numel() + 3) // 4 + 1 for p in params)
    grid = (max(1, min(max_prog, triton.cdiv(quads, BLOCK))),)
    out_t = params[0].dtype
    sr = rounding == "stochastic" and out_t != torch.float32
    _noise_axpy_kernel[grid](
        tab, T, float(gamma), float(beta), stream,
        K=len(keys), HAS_X=has_x, HAS_DENSE=dense is not None, SR=sr,
        OUT=_TL[out_t], DENSE=_PLANE_TL[plane_bits] if planes else _TL[dense_list[0].dtype],
        ALIGNED=_aligned(params, offsets) and (dense is None or _aligned(dense, offsets))
        and (not planes or all(pl.data_ptr() % 16 == 0 for pl in planes)) and (not scale or _aligned(scale, offsets)),
        FAST=not INTERPRET, BLOCK=BLOCK, num_warps=warps,
        EXACT=exact, INVERT=exact and any(u != 0.0 for u in undo),
        PLANE=(0 if not planes else 2 if any(u != 0.0 for u in undo) else 1), PBITS=plane_bits,
        RADEMACHER=noise == "rademacher", SCALED=bool(scale), SDT=_TL[scale[0].dtype] if scale else tl.float32,
        enable_fp_fusion=fp_fusion(noise == "rademacher"))
    return tab  # kept alive by the caller until the launch is queued


def _groups(params, dense, scale):
    """Indices of the non-empty tensors grouped by (param dtype, dense dtype, σ dtype): one launch per group."""
    groups = {}
    for i, p in enumerate(params):
        if p.numel():
            kind = (p.dtype, None if dense is None else dense[i].dtype, None if scale is None else scale[i].dtype)
            groups.setdefault(kind, []).append(i)
    return groups.values()


def _pick(xs, idx):
    return None if xs is None else [xs[i] for i in idx]


def noise_axpy(params, keys, alphas, gamma, dense, beta, rounding, tensor_ids, offsets, rounding_key,
               noise="gaussian", block=None, scale=None):
    for idx in _groups(params, dense, scale):
        _launch(_pick(params, idx), _pick(dense, idx), keys, alphas, gamma, beta, rounding, _pick(tensor_ids, idx),
                _pick(offsets, idx), rounding_key, block=block, stream=default_stream(noise), noise=noise,
                scale=_pick(scale, idx))


def noise_axpy_exact(params, keys, alphas, undo, gamma, planes, plane_bits, rounding, tensor_ids, offsets,
                     rounding_key, noise="gaussian", block=None, scale=None):
    for idx in _groups(params, None, scale):
        _launch(_pick(params, idx), None, keys, alphas, gamma, 0.0, rounding, _pick(tensor_ids, idx),
                _pick(offsets, idx), rounding_key, block=block, stream=default_stream(noise), noise=noise,
                undo=undo, planes=_pick(planes, idx) if planes else None, plane_bits=plane_bits,
                scale=_pick(scale, idx))


def noise(out, key, tensor_id, offset, stream, noise="gaussian", block=None):
    if out.numel():
        _launch([out], None, [key], [1.0], 0.0, 0.0, "nearest", [tensor_id], [offset], 0,
                stream=stream, has_x=False, block=block, noise=noise)
