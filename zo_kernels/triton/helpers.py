"""The Triton kernels' shared pieces (docs/spec.md §1, §3, §4, §9): the @triton.jit functions every kernel
of this package builds on (zo-noise v1 normals and the ±1 signs, rounding, the quad walk over a tensor,
exact restore's inversion and residue planes), the host helpers of their launches, and `compile_ptx`,
which builds any of the kernels ahead of time for a GPU target.

Kernels: noise_axpy.py (noise_axpy_, noise_), noise_adam.py (noise_adam_), lowrank.py
(lowrank_noise_axpy_).  One definition of each helper keeps their noise and rounding bit-identical.
"""
from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET:
    # libdevice has no interpreter implementation; FAST is False there.
    from triton.language.extra import libdevice
else:  # pragma: no cover - the name only has to exist
    libdevice = None

DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _uniform(x):
    return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _box_muller(xa, xb, FAST: tl.constexpr):
    # Accurate log: near u = 1 an approximate log can go positive (then sqrt gives NaN).
    r = tl.sqrt(-2.0 * tl.log(_uniform(xa)))
    th = TWO_PI * _uniform(xb)
    if FAST:
        # The angle is already in [0, 2π): no range reduction, no local memory.
        c = libdevice.fast_cosf(th)
        s = libdevice.fast_sinf(th)
    else:
        c = tl.cos(th)
        s = tl.sin(th)
    return r * c, r * s


@triton.jit
def _quad_words(key, gq, tid, stream):
    """Philox4x32-10 words for global quads gq ([B] int64): four [B] uint32 vectors."""
    c0 = (gq & 0xFFFFFFFF).to(tl.uint32)
    c1 = (gq >> 32).to(tl.uint32)
    c2 = (gq * 0 + tid).to(tl.uint32)
    c3 = (gq * 0 + stream).to(tl.uint32)
    return tl.philox(key, c0, c1, c2, c3)


@triton.jit
def _interleave(a, b, c, d):
    """Four [B] vectors -> [B, 4] with row i = (a_i, b_i, c_i, d_i)."""
    # join appends the new axis last, so the inner joins pair elements two apart.
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (a.shape[0], 4))


@triton.jit
def _normals(key, gq, tid, stream, FAST: tl.constexpr):
    x0, x1, x2, x3 = _quad_words(key, gq, tid, stream)
    z0, z1 = _box_muller(x0, x1, FAST)
    z2, z3 = _box_muller(x2, x3, FAST)
    return _interleave(z0, z1, z2, z3)


@triton.jit
def _signs(key, gq, tid, stream):
    """The ±1 signs of docs/spec.md §9 for global quads gq, as [B, 4]: quad gq holds bits 4 (gq mod 8) ..
    +3 of word (gq mod 32) // 8 of sign block gq // 32.  One Philox call per quad, as csrc/philox.h's
    signs4 (each program owns quads, and the pass is memory-bound on a GPU)."""
    w0, w1, w2, w3 = _quad_words(key, gq >> 5, tid, stream)
    sel = (gq >> 3) & 3
    word = tl.where(sel == 0, w0, tl.where(sel == 1, w1, tl.where(sel == 2, w2, w3)))
    bits = word >> (4 * (gq & 7)).to(tl.uint32)
    bit = (bits[:, None] >> tl.arange(0, 4).to(tl.uint32)[None, :]) & 1
    # bit 0 -> +1.0, bit 1 -> -1.0: the bit goes to 1.0f's sign bit
    return (bit << 31 | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _noise(key, gq, tid, stream, FAST: tl.constexpr, RADEMACHER: tl.constexpr):
    """The noise of global quads gq as [B, 4]: normals (§1), or with RADEMACHER the signs of §9."""
    if RADEMACHER:
        z = _signs(key, gq, tid, stream)
    else:
        z = _normals(key, gq, tid, stream, FAST)
    return z


def fp_fusion(rademacher: bool) -> bool:
    """Whether a launch lets the compiler contract a·b + c into one FMA.  Not for ±1 launches: there
    every backend must give the reference's bits (docs/spec.md §9), which round each product and sum
    separately (γ·θ + α·s fused would round once)."""
    return not rademacher


@triton.jit
def _stochastic_round(acc, words, OUT: tl.constexpr):
    """Round fp32 acc to bf16/fp16, up with probability = the dropped fraction (see noise.stochastic_round)."""
    bits = acc.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    if OUT == tl.bfloat16:
        up = (bits + (words >> 16)) & 0xFFFF0000
        r = tl.where(finite, up.to(tl.float32, bitcast=True), acc)
    else:
        up = (bits + (words >> 19)) & 0xFFFFE000
        r = tl.where(finite, up.to(tl.float32, bitcast=True), acc)
        mag = tl.abs(acc)
        scaled = mag * 16777216.0
        fl = tl.floor(scaled)
        bump = ((words >> 8).to(tl.float32) < (scaled - fl) * 16777216.0).to(tl.float32)
        sub = (fl + bump) * 5.960464477539063e-08
        sub = tl.where(acc < 0, -sub, sub)
        r = tl.where(mag < 6.103515625e-05, sub, r)
    return r.to(OUT)


@triton.jit
def _round_nearest(acc, OUT: tl.constexpr):
    if OUT == tl.bfloat16:
        # RNE in the fp32 bit pattern, so the cast below is exact: the interpreter's own
        # fp32 -> bf16 cast truncates (GPUs round to nearest even either way).
        bits = acc.to(tl.uint32, bitcast=True)
        rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        acc = tl.where(acc != acc, acc, rne)
    return acc.to(OUT)


@triton.jit
def _coef(ptr):
    """A float64 coefficient stored as int64 bits in the table, as fp32."""
    return tl.load(ptr).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def _round_store(p, idx, mask, acc, sr_key_ptr, gq, tid, SR: tl.constexpr, OUT: tl.constexpr):
    """Round the fp32 result to the param dtype (stochastically: stream-2 words of the key at
    sr_key_ptr, read only then) and store it."""
    if SR:
        w0, w1, w2, w3 = _quad_words(tl.load(sr_key_ptr), gq, tid, 2)
        out = _stochastic_round(acc, _interleave(w0, w1, w2, w3), OUT)
    else:
        out = _round_nearest(acc, OUT)
    tl.store(p + idx, out, mask=mask)


@triton.jit
def _column_ptr(tab, col, T, t, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor t's pointer in column `col` of a T-row table, typed; 16-byte aligned when the host checked."""
    ptr = tl.load(tab + col * T + t).to(tl.pointer_type(DT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _column_extent(tab, col, T, t):
    """Tensor t's (numel, tensor id, element offset): columns col, col + 1, col + 2 of the table."""
    return tl.load(tab + col * T + t), tl.load(tab + (col + 1) * T + t), tl.load(tab + (col + 2) * T + t)


@triton.jit
def _walk_quads(tile: tl.constexpr, args, consts: tl.constexpr, n, off, owns_tail, pid, nprog,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's share of one tensor (n elements from global element offset off), in [BLOCK, 4]
    quad tiles: tile(idx, mask, gq, lq, *args, *consts) with the tiles' element indices and mask, their
    global quads (the Philox counters) and local quads (residue-plane words); programs take blocks
    round-robin.  Every kernel walks its tensors through here."""
    lane = tl.arange(0, 4)
    q0 = off // 4
    if ALIGNED:
        # Host checked: pointers 16-byte aligned and off % 4 == 0, so local quads are global quads
        # shifted by off // 4 and a quad-granular mask keeps loads and stores vectorised; the
        # <= 3-element tail goes through an element mask, in the program that owns it.
        full = n // 4
        for b in range(pid, tl.cdiv(full, BLOCK), nprog):
            lq = b * BLOCK + tl.arange(0, BLOCK)
            tile(lq[:, None] * 4 + lane[None, :], (lq < full)[:, None], lq + q0, lq, *args, *consts)
        if (n % 4 != 0) & owns_tail:
            lq = full + tl.arange(0, 2)
            idx = lq[:, None] * 4 + lane[None, :]
            tile(idx, idx < n, lq + q0, lq, *args, *consts)
    else:
        for b in range(pid, tl.cdiv((off + n + 3) // 4 - q0, BLOCK), nprog):
            lq = b * BLOCK + tl.arange(0, BLOCK)
            gq = q0 + lq
            idx = gq[:, None] * 4 + lane[None, :] - off
            tile(idx, (idx >= 0) & (idx < n), gq, lq, *args, *consts)


@triton.jit
def _ordered(x, OUT: tl.constexpr):
    """Grid position of each value (int32): consecutive representable values are consecutive ints."""
    if OUT == tl.float32:
        bits = x.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
    else:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        mag = bits & 0x7FFF
    return tl.where(bits != mag, -mag - 1, mag)


@triton.jit
def _from_ordered(o, OUT: tl.constexpr):
    if OUT == tl.float32:
        bits = tl.where(o >= 0, o, (-o - 1) | (-2147483647 - 1))
        return bits.to(tl.float32, bitcast=True)
    else:
        bits = tl.where(o >= 0, o, (-o - 1) | 0x8000)
        return bits.to(tl.int16).to(OUT, bitcast=True)


@triton.jit
def _try_candidate(cand, est, y_ord, s, best, best_dist, hits, LIM: tl.constexpr, OUT: tl.constexpr):
    inside = (cand >= -LIM) & (cand < LIM)
    cand_c = tl.minimum(tl.maximum(cand, -LIM), LIM - 1)
    fwd = _ordered(_round_nearest(_from_ordered(cand_c, OUT).to(tl.float32) + s, OUT), OUT)
    ok = inside & (fwd == y_ord)
    dist = tl.abs(cand - est)
    better = ok & (dist < best_dist)
    return tl.where(better, cand_c, best), tl.where(better, dist, best_dist), hits + ok.to(tl.int32)


@triton.jit
def _invert_rounding(y, s_undo, pp, qi, qmask, OUT: tl.constexpr, PLANE: tl.constexpr, PBITS: tl.constexpr):
    """θ0 such that round(θ0 + s_undo) == y, for finite y (others pass through): the candidates near
    round(y - s_undo) on the grid of ordered values, or, with a residue plane (PLANE == 2), the ones
    whose low PBITS bits match the stored residue; the nearest candidate that rounds back to y wins."""
    lane = tl.arange(0, 4)
    RMASK: tl.constexpr = (1 << PBITS) - 1
    if OUT == tl.float32:
        LIM: tl.constexpr = 2147483647
    else:
        LIM: tl.constexpr = 32768
    y_ord = _ordered(y, OUT)
    est = _ordered(_round_nearest(y.to(tl.float32) - s_undo, OUT), OUT)
    best = est
    best_dist = tl.full(y.shape, 2147483647, tl.int32)
    hits = tl.zeros(y.shape, tl.int32)
    if PLANE == 2:
        word = tl.load(pp + qi, mask=qmask, other=0).to(tl.int32)
        if PBITS < 8:
            word = word & ((1 << (4 * PBITS)) - 1)  # int16 words sign-extend
        res = (word[:, None] >> (lane[None, :] * PBITS)) & RMASK
        base = est - ((est - res) & RMASK)
        best, best_dist, hits = _try_candidate(base, est, y_ord, s_undo, best, best_dist, hits, LIM, OUT)
        best, best_dist, hits = _try_candidate(base + (1 << PBITS), est, y_ord, s_undo, best, best_dist, hits,
                                               LIM, OUT)
        best, best_dist, hits = _try_candidate(base - (1 << PBITS), est, y_ord, s_undo, best, best_dist, hits,
                                               LIM, OUT)
    else:
        best, best_dist, hits = _try_candidate(est, est, y_ord, s_undo, best, best_dist, hits, LIM, OUT)
        best, best_dist, hits = _try_candidate(est - 1, est, y_ord, s_undo, best, best_dist, hits, LIM, OUT)
        best, best_dist, hits = _try_candidate(est + 1, est, y_ord, s_undo, best, best_dist, hits, LIM, OUT)
    yf = y.to(tl.float32)
    finite = (yf == yf) & (tl.abs(yf) < float("inf"))
    return tl.where(finite, _from_ordered(best, OUT), y)


@triton.jit
def _write_plane(pp, qi, qmask, theta0, mask, OUT: tl.constexpr, PBITS: tl.constexpr):
    """One word per quad: the low PBITS bits of each element's ordered value, lane 0 lowest."""
    # Outside the tensor theta0 counts as +0 (residue 0), as restore.pack_residues writes it.
    res = _ordered(tl.where(mask, theta0, 0.0).to(OUT), OUT) & ((1 << PBITS) - 1)
    word = tl.sum(res << (tl.arange(0, 4)[None, :] * PBITS), axis=1)
    tl.store(pp + qi, word.to(pp.dtype.element_ty), mask=qmask)


# --------------------------------------------------------------------- host
def _config(device: torch.device):
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return 256, 4, sms * 8  # BLOCK quads, warps, max programs
    return 1024, 1, 2  # interpreter: few, wide programs keep the Python overhead down


def _aligned(tensors, offsets) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(o % 4 == 0 for o in offsets)


def f64_bits(xs) -> list:
    """Each value's float64 bit pattern as a signed int64: how coefficients ride in an int64 table."""
    return [struct.unpack("<q", struct.pack("<d", float(x)))[0] for x in xs]




# ------------------------------------------------------------ ahead of time
def compile_ptx(kernel, cc: int, signature: dict, constexprs: dict, *, aligned=(0,), num_warps: int = 4) -> str:
    """PTX of `kernel` for sm_<cc>, without a GPU: what each kernel module's `aot_ptx` calls.

    signature: the Triton type of every runtime argument ("*i64", "fp32", ...); every other argument
    is a constexpr whose value `constexprs` gives (a dtype by its triton.language name, "float32").
    aligned: the pointer arguments known to be 16-byte aligned, as every torch allocation is.
    Run without TRITON_INTERPRET: under the interpreter triton.language's own helpers are
    interpreted functions (see aot.py)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    const = {k: getattr(tl, v) if isinstance(v, str) else v for k, v in constexprs.items()}
    src = ASTSource(kernel, sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": num_warps,
                                "enable_fp_fusion": fp_fusion(constexprs.get("RADEMACHER", False))})
    return k.asm["ptx"]
