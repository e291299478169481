"""Low-rank noise (LOZO, Chen et al. ICLR 2025) and its fused primitive, with the PyTorch reference
(docs/spec.md §7).

    lowrank_noise_axpy_(params, keys_u, key_v, alphas, rank=r)
        θ ← gamma·θ + Σ_j alphas[j]·U_j Vᵀ          (one pass over θ, for every tensor)

The noise (docs/spec.md §7, which also states the op's signature and arithmetic).  A tensor with ndim ≥ 2 is viewed as (m, n) = (shape[0], numel/shape[0]);
its perturbation is Z = U Vᵀ with U ∈ R^{m×r}, V ∈ R^{n×r}, both zo-noise v1 normals on their own
Philox streams:

    U[i, k] = z(key_u, t, i·r + k, stream 3)      i the global row (a dim-0 shard's rows are global)
    V[j, k] = z(key_v, t, j·r + k, stream 4)
    Z[i, j] = Σ_{k<r} U[i, k]·V[j, k]             no 1/√r factor (LOZO's convention), k in order

Tensors with ndim < 2 get ordinary z(key_u, t) (stream 0), as in LOZO: the op hands them to the
full-rank primitive (noise_axpy_) with the same keys and coefficients.

The fp32 arithmetic that every backend follows (the kernels' order, so exact restore can re-apply a
perturbation bit for bit):

    W[i, k] = Σ_j alphas[j]·U_j[i, k]  (+ beta·dense[i, k])    from +0, keys in order, fp32
    s[i, j] = Σ_k W[i, k]·V[j, k]                              from W[i,0]·V[j,0], k in order, fp32
    θ[i, j] ← round(gamma·θ[i, j] + s[i, j])

Several U keys share one V, so a restore + update (+μ on the step's U, −ηc on the same U) is one
pass, and W and V are (m + n)·r numbers per tensor: the native kernels generate them into a scratch
buffer and allocate nothing of θ's size.  `dense` here is a U-space term (m×r per matrix, fp32):
LOZO-M's momentum, applied as β·M Vᵀ in the same pass.

Exact restore (zo_kernels.restore) works as in the full-rank form: `undo` gives the coefficients,
per U key, of the low-rank perturbation θ carries now (from an earlier call with gamma = 1 and
nearest rounding under the same key_v); θ is recovered by inverting that rounding, then the new
coefficients apply.  `planes` (restore.make_planes) hold the residues that resolve ambiguous elements.

float64 parameters are computed in float64 by the reference (U, V and the sum too): the oracle.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import backends as _backends
from .noise import DROPPED_BITS, M64, normal, random_words, stochastic_round
from .restore_args import check_exact_args
from .rounding import check_rounding, lowrank_rounding_key
from .validate import (
    check_int,
    check_key,
    check_no_overlap,
    check_params,
    check_placement,
    check_scalar,
    check_tensor,
    named_tensors,
)

U_STREAM, V_STREAM = 3, 4
MAX_RANK = 64


# ---------------------------------------------------------------- the noise
def cols_of(shape) -> int:
    """n of the (m, n) view: the product of all dims after the first."""
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def lowrank_u(key_u: int, tensor_id: int, rows: int, rank: int, *, row0: int = 0, dtype=torch.float32,
              device="cpu") -> torch.Tensor:
    """U[row0 : row0+rows, :] (rows × rank): the row factor, redrawn every step."""
    flat = normal(key_u & M64, tensor_id, rows * rank, offset=row0 * rank, stream=U_STREAM, dtype=dtype,
                  device=device)
    return flat.view(rows, rank)


def lowrank_v(key_v: int, tensor_id: int, cols: int, rank: int, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """V (cols × rank): the column factor, kept for ν steps (its key is the period's key)."""
    return normal(key_v & M64, tensor_id, cols * rank, stream=V_STREAM, dtype=dtype, device=device).view(cols, rank)


def lowrank_noise(key_u: int, key_v: int, tensor_id: int, shape, rank: int, *, row0: int = 0,
                  dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Z = U Vᵀ materialised in `shape` (rows row0 .. of a dim-0 shard); for ndim < 2, z(key_u).

    For tests and debugging (it allocates θ's size).  float64 by default: the precise values."""
    shape = tuple(shape)
    if len(shape) < 2:
        n = 1
        for s in shape:
            n *= s
        return normal(key_u & M64, tensor_id, n, offset=row0, dtype=dtype, device=device).view(shape)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u = lowrank_u(key_u, tensor_id, shape[0], rank, row0=row0, dtype=work, device=device)
    v = lowrank_v(key_v, tensor_id, cols_of(shape), rank, dtype=work, device=device)
    z = u[:, :1] * v[:, 0]
    for k in range(1, rank):
        z = z + u[:, k:k + 1] * v[:, k]
    return z.to(dtype).view(shape)


# --------------------------------------------------------------- reference
def row_factor(keys_u, coeffs, tensor_id, rows, rank, row0, work, device, dense=None, beta=0.0):
    """W = Σ_j coeffs[j]·U_j (+ beta·dense), from +0 in key order: the kernels' order."""
    w = torch.zeros(rows, rank, dtype=work, device=device)
    for k, c in zip(keys_u, coeffs):
        w = w + c * lowrank_u(k, tensor_id, rows, rank, row0=row0, dtype=work, device=device)
    if dense is not None:
        w = w + beta * dense.to(work)
    return w


def lowrank_sum(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """s = W Vᵀ (flat, rows·cols) with the products summed over k in order, each op rounded."""
    s = w[:, :1] * v[:, 0]
    for k in range(1, w.shape[1]):
        s = s + w[:, k:k + 1] * v[:, k]
    return s.reshape(-1)


def lowrank_axpy_reference(params, keys_u, key_v, alphas, undo, gamma, dense, beta, planes, plane_bits, rank,
                           rounding, tensor_ids, offsets, rounding_key):
    """The low-rank pass for tensors with ndim ≥ 2 (the op routes the others to noise_axpy_).

    undo None: θ ← round(gamma·θ + s).  undo given: θ0 ← invert(θ, s_undo [, plane]) when some undo is
    nonzero, else the plane records θ's residues (when planes are given); then θ ← round(gamma·θ0 + s).
    """
    from .restore import invert, pack_residues, to_ordered, unpack_residues

    inverting = undo is not None and any(u != 0.0 for u in undo)
    for i, p in enumerate(params):
        tid, off = tensor_ids[i], offsets[i]
        m, n = p.shape[0], cols_of(p.shape)
        row0 = off // n if n else 0
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        v = lowrank_v(key_v, tid, n, rank, dtype=work, device=p.device)
        d = dense[i] if dense is not None else None
        s = lowrank_sum(row_factor(keys_u, alphas, tid, m, rank, row0, work, p.device, d, beta), v)
        y = p.reshape(-1)
        theta0 = y
        if inverting:
            su = lowrank_sum(row_factor(keys_u, undo, tid, m, rank, row0, work, p.device), v)
            res = unpack_residues(planes[i], p.numel(), off, plane_bits) if planes else None
            theta0, _ = invert(y, su, res, plane_bits)
        elif planes:
            r = to_ordered(theta0) & ((1 << plane_bits) - 1)
            planes[i].copy_(pack_residues(r, p.numel(), off, plane_bits))
        acc = theta0.to(work) * gamma + s
        if rounding == "stochastic" and p.dtype in DROPPED_BITS:
            out = stochastic_round(acc, p.dtype, random_words(rounding_key, tid, p.numel(), offset=off,
                                                              device=p.device))
        else:
            out = acc.to(p.dtype)
        p.copy_(out.view_as(p))


# -------------------------------------------------------------------- op
@torch.library.custom_op("zo_kernels::lowrank_noise_axpy_", mutates_args=("params", "planes"))
def _lowrank_op(params: List[torch.Tensor], keys_u: List[int], key_v: int, alphas: List[float],
                undo: List[float], gamma: float, dense: List[torch.Tensor], beta: float,
                planes: List[torch.Tensor], plane_bits: int, rank: int, rounding: str, tensor_ids: List[int],
                offsets: List[int], rounding_key: int, backend: str) -> None:
    # Empty lists stand for "none" (the schema has no optional tensor lists); `undo` empty: plain form.
    check_no_overlap(named_tensors(params, dense, planes))     # real tensors here, also under torch.compile
    b = _backends.get(backend)
    exact = len(undo) > 0
    matrices = [i for i, p in enumerate(params) if p.dim() >= 2]
    vectors = [i for i, p in enumerate(params) if p.dim() < 2]

    def pick(xs, idx):
        return [xs[i] for i in idx] if xs else []

    if matrices:
        b.lowrank(pick(params, matrices), list(keys_u), key_v, list(alphas), list(undo) if exact else None, gamma,
                  pick(dense, matrices) or None, beta, pick(planes, matrices) or None, plane_bits, rank, rounding,
                  pick(tensor_ids, matrices), pick(offsets, matrices), rounding_key)
    if vectors:
        ps, ids, offs = pick(params, vectors), pick(tensor_ids, vectors), pick(offsets, vectors)
        if exact:
            b.axpy_exact(ps, list(keys_u), list(alphas), list(undo), gamma, pick(planes, vectors) or None,
                         plane_bits, rounding, ids, offs, rounding_key)
        else:
            b.axpy(ps, list(keys_u), list(alphas), gamma, pick(dense, vectors) or None, beta, rounding, ids, offs,
                   rounding_key)
    _backends._set_last(backend)


@_lowrank_op.register_fake
def _(params, keys_u, key_v, alphas, undo, gamma, dense, beta, planes, plane_bits, rank, rounding, tensor_ids,
      offsets, rounding_key, backend):
    return None


def lowrank_noise_axpy_(params, keys_u, key_v, alphas, *, rank: int, gamma: float = 1.0, dense=None,
                        beta: float = 0.0, rounding: str = "nearest", tensor_ids=None, offsets=None,
                        rounding_key=None, backend: Optional[str] = None, undo=None, planes=None) -> None:
    """In place, for every tensor t: θ_t ← gamma·θ_t + (Σ_j alphas[j]·U_j + beta·dense_t) Vᵀ.

    params      contiguous floating tensors on one device; ndim ≥ 2: low-rank noise U_j Vᵀ of the
                (shape[0], rest) view; ndim < 2: ordinary z(keys_u[j]) (noise_axpy_)
    keys_u      64-bit keys of the row factors U_j, one per alpha;  key_v: the column factor's key
    rank        r, in [1, 64]
    dense       optional, per tensor: for ndim ≥ 2 a float32 (shape[0], rank) U-space term (LOZO-M's
                momentum), for ndim < 2 a θ-shaped term as in noise_axpy_ (not in the exact form);
                scaled by beta; a None entry means no term for that tensor
    tensor_ids  the id t of each tensor (default: its position);  offsets: global index of each
                tensor's first element; for ndim ≥ 2 a dim-0 shard, so a multiple of numel/shape[0]
    rounding    "nearest" | "stochastic" (bf16/fp16; stream 2 under rounding_key)
    undo/planes exact restore, as in noise_axpy_ (per U key; no dense term for ndim < 2 tensors)
    backend     "reference", "cpu", "triton" (else $ZO_KERNELS_BACKEND, else the best here)

    Checks everything before anything is written.  Scratch: (m + n)·r floats per matrix.
    """
    params = check_params(params)
    rank = check_int(rank, "rank", 1, MAX_RANK)
    if isinstance(keys_u, int) or (isinstance(keys_u, torch.Tensor) and keys_u.dim() == 0):
        keys_u = [keys_u]
    if isinstance(alphas, (int, float)) or (isinstance(alphas, torch.Tensor) and alphas.dim() == 0):
        alphas = [alphas]
    keys_u = [check_key(k, f"keys_u[{j}]") for j, k in enumerate(keys_u)]
    key_v = check_key(key_v, "key_v")
    alphas = [check_scalar(a, f"alphas[{j}]") for j, a in enumerate(alphas)]
    if len(keys_u) != len(alphas):
        raise ValueError(f"len(keys_u)={len(keys_u)} but len(alphas)={len(alphas)}: one coefficient per key")
    gamma = check_scalar(gamma, "gamma")
    beta = check_scalar(beta, "beta")
    check_rounding(rounding)
    n = len(params)
    tensor_ids, offsets = check_placement(tensor_ids, offsets, n)
    for i, p in enumerate(params):
        if p.dim() >= 2:
            cols = cols_of(p.shape)
            if cols and offsets[i] % cols:
                raise ValueError(f"offsets[{i}]={offsets[i]} is not a multiple of the row length {cols} of "
                                 f"params[{i}] (shape {tuple(p.shape)}): low-rank noise takes dim-0 shards only")
    exact = undo is not None or planes is not None
    if dense is not None:
        if isinstance(dense, torch.Tensor):
            dense = [dense]
        dense = list(dense)
        if len(dense) != n:
            raise ValueError(f"dense has {len(dense)} tensors for {n} params")
        for i, (d, p) in enumerate(zip(dense, params)):
            if d is None:
                continue
            check_tensor(d, f"dense[{i}]", p.device)
            if p.dim() >= 2:
                if d.dtype != torch.float32 or tuple(d.shape) != (p.shape[0], rank):
                    raise ValueError(f"dense[{i}] must be a float32 ({p.shape[0]}, {rank}) U-space term for "
                                     f"params[{i}] of shape {tuple(p.shape)}, got {d.dtype} {tuple(d.shape)}")
            else:
                if d.shape != p.shape:
                    raise ValueError(f"dense[{i}] has shape {tuple(d.shape)} but params[{i}] has {tuple(p.shape)}")
                if exact:
                    raise ValueError(f"dense[{i}]: the exact-restore form (undo/planes) takes no dense term for "
                                     f"tensors with ndim < 2")
        # None: no term for that tensor (zeros of the small U-space shape, or θ's shape for vectors)
        dense = [d if d is not None else torch.zeros((p.shape[0], rank) if p.dim() >= 2 else p.shape,
                                                     dtype=torch.float32 if p.dim() >= 2 else p.dtype,
                                                     device=p.device)
                 for d, p in zip(dense, params)]
        if exact:
            dense = [d if p.dim() >= 2 else torch.zeros(0, device=p.device) for d, p in zip(dense, params)]
    if rounding_key is None:
        rounding_key = lowrank_rounding_key(keys_u, key_v, alphas, gamma, beta, rank)
    rounding_key = check_key(rounding_key, "rounding_key")
    chosen = _backends.choose(params, backend)
    _backends.require(chosen, "lowrank", "has no low-rank pass")
    bits = 2
    if exact:
        undo, planes, bits = check_exact_args(params, keys_u, undo, planes, offsets, chosen)
    with torch.no_grad():
        _lowrank_op(params, keys_u, key_v, alphas, undo if exact else [], gamma, dense or [], beta, planes or [],
                    bits, rank, rounding, tensor_ids, offsets, rounding_key, chosen.name)
