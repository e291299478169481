"""Triton kernel of the low-rank pass (zo_kernels.lowrank is the reference; docs/spec.md §7).

    θ ← round(gamma·θ0 + Σ_k W[i, k]·V[j, k]),   W = Σ_j alphas[j]·U_j (+ beta·dense)

The host generates the factors of each tensor into scratch — U_j and V with the full-rank kernel's
`noise` on streams 3 and 4, W (and Wu for the undo coefficients) summed in fp32 from +0 in key order,
(m + n)·r floats in all — then one launch per tensor walks θ in whole quads, as the full-rank kernel
does, so residue-plane words and stochastic-rounding quads belong to one program.  Each element
gathers its row of W and its row of V (both cached: a tile touches a few rows of W and BLOCK·4
consecutive rows of V) and sums the r products in registers.  Exact restore (inverting the carried
perturbation's rounding, the residue plane), rounding and the quad walk are helpers.py's, as the
full-rank kernel's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .helpers import (
    _TL,
    _config,
    _invert_rounding,
    _round_store,
    _walk_quads,
    _write_plane,
    compile_ptx,
)
from .noise_axpy import noise as _noise

U_STREAM, V_STREAM = 3, 4
_PLANE_TORCH = {2: torch.uint8, 4: torch.int16, 8: torch.int32}


@triton.jit
def _lowrank_sum(w, v, row, col, mask, R: tl.constexpr):
    """s = Σ_k W[row, k]·V[col, k], k in order, from the first product."""
    s = tl.load(w + row * R, mask=mask, other=0.0) * tl.load(v + col * R, mask=mask, other=0.0)
    for k in tl.static_range(1, R):
        s += tl.load(w + row * R + k, mask=mask, other=0.0) * tl.load(v + col * R + k, mask=mask, other=0.0)
    return s


@triton.jit
def _tile(idx, mask, gq, lq, p, w, wu, v, pp, meta, n, tid, gamma, R: tl.constexpr, SR: tl.constexpr,
          OUT: tl.constexpr, INVERT: tl.constexpr, PLANE: tl.constexpr, PBITS: tl.constexpr):
    row = idx // n
    col = idx - row * n
    s_new = _lowrank_sum(w, v, row, col, mask, R)
    y = tl.load(p + idx, mask=mask)
    qmask = tl.max(mask.to(tl.int32), axis=1) > 0
    theta0 = y
    if INVERT:
        theta0 = _invert_rounding(y, _lowrank_sum(wu, v, row, col, mask, R), pp, lq, qmask, OUT, PLANE, PBITS)
    if PLANE == 1:
        _write_plane(pp, lq, qmask, theta0, mask, OUT, PBITS)
    _round_store(p, idx, mask, theta0.to(tl.float32) * gamma + s_new, meta + 4, gq, tid, SR, OUT)


@triton.jit
def _lowrank_kernel(p, w, wu, v, pp, meta, gamma, R: tl.constexpr, SR: tl.constexpr, OUT: tl.constexpr,
                    INVERT: tl.constexpr, PLANE: tl.constexpr, PBITS: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr):
    # meta: numel, row length n, global offset, tensor id, rounding key (int64: a value never changes
    # the argument types Triton specialises on)
    numel = tl.load(meta)
    n = tl.load(meta + 1)
    off = tl.load(meta + 2)
    tid = tl.load(meta + 3)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    _walk_quads(_tile, (p, w, wu, v, pp, meta, n, tid, gamma), (R, SR, OUT, INVERT, PLANE, PBITS),
                numel, off, pid == 0, pid, nprog, ALIGNED, BLOCK)


AOT_CASES = [
    ("lowrank_r2_fp32", dict(R=2, SR=False, OUT="float32", PP="float32")),
    ("lowrank_r8_bf16_sr", dict(R=8, SR=True, OUT="bfloat16", PP="float32")),
    ("lowrank_r4_bf16_write_plane2", dict(R=4, SR=False, OUT="bfloat16", PP="uint8", PLANE=1, PBITS=2)),
    ("lowrank_r4_bf16_invert_plane8", dict(R=4, SR=False, OUT="bfloat16", PP="int32", INVERT=True, PLANE=2,
                                           PBITS=8)),
    ("lowrank_r2_fp32_unaligned", dict(R=2, SR=False, OUT="float32", PP="float32", ALIGNED=False)),
]


def aot_ptx(cc: int, block: int = 256, num_warps: int = 4, **const) -> str:
    """PTX of the kernel for sm_<cc> without a GPU (helpers.compile_ptx); PP: the plane's dtype name."""
    const = dict(dict(ALIGNED=True, BLOCK=block, INVERT=False, PLANE=0, PBITS=2), **const)
    ptrs = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "uint8": "*u8", "int32": "*i32"}
    sig = {"p": ptrs[const["OUT"]], "w": "*fp32", "wu": "*fp32", "v": "*fp32", "pp": ptrs[const.pop("PP")],
           "meta": "*i64", "gamma": "fp32"}
    return compile_ptx(_lowrank_kernel, cc, sig, const, aligned=range(6), num_warps=num_warps)


# --------------------------------------------------------------------- host
def _normals(count, key, tid, offset, stream, device):
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count:
        _noise(out, key, tid, offset, stream)
    return out


def factors(p, keys_u, key_v, alphas, undo, dense, beta, rank, tid, row0):
    """(W, Wu or None, V) of one tensor, flat fp32: the kernels' order (from +0, keys in order)."""
    m, n = p.shape[0], p.numel() // p.shape[0]
    w = torch.zeros(m * rank, dtype=torch.float32, device=p.device)
    wu = torch.zeros_like(w) if undo is not None and any(c != 0.0 for c in undo) else None
    for j, k in enumerate(keys_u):
        u = _normals(m * rank, k, tid, row0 * rank, U_STREAM, p.device)
        w = w + torch.mul(u, alphas[j])
        if wu is not None:
            wu = wu + torch.mul(u, undo[j])
    if dense is not None:
        w = w + torch.mul(dense.reshape(-1), beta)
    return w, wu, _normals(n * rank, key_v, tid, 0, V_STREAM, p.device)


def lowrank_axpy(params, keys_u, key_v, alphas, undo, gamma, dense, beta, planes, plane_bits, rank, rounding,
                 tensor_ids, offsets, rounding_key, block=None):
    inverting = undo is not None and any(c != 0.0 for c in undo)
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        n = p.numel() // p.shape[0]
        off, tid = offsets[i], tensor_ids[i]
        w, wu, v = factors(p, keys_u, key_v, alphas, undo if inverting else None,
                           dense[i] if dense else None, beta, rank, tid, off // n)
        plane = planes[i] if planes else None
        meta = torch.tensor([p.numel(), n, off, tid, rounding_key], dtype=torch.int64).to(p.device, non_blocking=True)
        if plane is not None:
            plane = plane.view(_PLANE_TORCH[plane_bits])   # one word per quad
        default_block, warps, max_prog = _config(p.device)
        BLOCK = block or default_block
        nq = (off + p.numel() + 3) // 4 - off // 4
        grid = (max(1, min(max_prog, triton.cdiv(nq, BLOCK))),)
        _lowrank_kernel[grid](
            p, w, wu if wu is not None else w, v, plane if plane is not None else w, meta, float(gamma), R=rank, SR=rounding == "stochastic" and p.dtype != torch.float32, OUT=_TL[p.dtype],
            INVERT=inverting, PLANE=0 if plane is None else (2 if inverting else 1), PBITS=plane_bits,
            ALIGNED=p.data_ptr() % 16 == 0 and off % 4 == 0, BLOCK=BLOCK, num_warps=warps)
