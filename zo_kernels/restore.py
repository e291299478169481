"""Exact restore: undo a rounded perturbation by inverting the rounding, not by adding −μz again
(docs/spec.md §4).

A perturbation pass computes y = F(θ0) = round(θ0 + Σ_j u_j·z_j) (fp32, one
rounding to θ's dtype).  F is monotone on the grid of θ's dtype, so its
preimage of y is a run of consecutive grid points; usually one point, but
several where θ0 + u·z crossed into a coarser binade.  The inverse takes the
nearest estimate e = round(y − Σ u_j z_j) and checks e and its neighbours by
re-applying F exactly as the forward pass did.

Where the preimage has more than one point the value is ambiguous.  A
residue plane resolves it: the forward pass stores, per element, the low
`bits` bits of θ0's position on the grid (its "ordered" integer), and the
inverse picks the preimage point with that residue.  With b bits every run
of up to 2**b points is resolved exactly.  Planes are packed per quad
(b = 2, 4 or 8 → 1, 2 or 4 bytes per 4 elements).

This module is the reference; backends implement the same integer rules.
"""
from __future__ import annotations

import torch

from .noise import DROPPED_BITS, noise_values, scaled

PLANE_BITS = (2, 4, 8)
_WIDTH = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}
PLANE_DTYPES = tuple(_WIDTH)      # dtypes whose rounding the exact form inverts
_INT_VIEW = {16: torch.int16, 32: torch.int32}


def plane_numel_bytes(numel: int, offset: int, bits: int) -> int:
    """Bytes of the residue plane of one tensor: one (bits·4)-bit word per global quad it touches."""
    if numel == 0:
        return 0
    quads = (offset + numel + 3) // 4 - offset // 4
    return quads * bits // 2


def make_planes(params, bits: int, offsets=None):
    """Allocate residue planes for a parameter list (uint8, on the params' device)."""
    if bits not in PLANE_BITS:
        raise ValueError(f"plane bits must be one of {PLANE_BITS}, got {bits}")
    offsets = offsets or [0] * len(params)
    return [torch.zeros(plane_numel_bytes(p.numel(), o, bits), dtype=torch.uint8, device=p.device)
            for p, o in zip(params, offsets)]


# ------------------------------------------------------- grid <-> ordered ints
def to_ordered(x: torch.Tensor) -> torch.Tensor:
    """Grid position of each value as int64: consecutive representable values are consecutive ints
    (−0 is −1, +0 is 0)."""
    w = _WIDTH[x.dtype]
    bits = x.view(_INT_VIEW[w]).to(torch.int64) & ((1 << w) - 1)
    sign = bits >> (w - 1)
    mag = bits & ((1 << (w - 1)) - 1)
    return torch.where(sign == 1, -mag - 1, mag)


def from_ordered(o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = _WIDTH[dtype]
    bits = torch.where(o >= 0, o, (-o - 1) | (1 << (w - 1)))
    bits = bits - ((bits >> (w - 1)) << w)  # to the signed range of the int view
    return bits.to(_INT_VIEW[w]).view(dtype)


def _round_nearest(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return acc.to(dtype)


# -------------------------------------------------------------- plane packing
def pack_residues(res: torch.Tensor, numel: int, offset: int, bits: int) -> torch.Tensor:
    """Per-element residues (int64, numel) -> packed uint8 plane bytes (little-endian words)."""
    lead = offset % 4
    quads = (offset + numel + 3) // 4 - offset // 4
    full = torch.zeros(quads * 4, dtype=torch.int64, device=res.device)
    full[lead:lead + numel] = res
    words = (full.view(quads, 4) << (torch.arange(4, device=res.device) * bits)).sum(1)
    nbytes = bits // 2
    out = torch.stack([(words >> (8 * i)) & 0xFF for i in range(nbytes)], 1)
    return out.reshape(-1).to(torch.uint8)


def unpack_residues(plane: torch.Tensor, numel: int, offset: int, bits: int) -> torch.Tensor:
    nbytes = bits // 2
    b = plane.to(torch.int64).view(-1, nbytes)
    words = sum(b[:, i] << (8 * i) for i in range(nbytes))
    res = (words[:, None] >> (torch.arange(4, device=plane.device) * bits)) & ((1 << bits) - 1)
    lead = offset % 4
    return res.reshape(-1)[lead:lead + numel]


# ------------------------------------------------------------------- inverse
def noise_sum(zs, coeffs, numel, device):
    """Σ_j c_j·z_j accumulated in fp32 in key order: the perturbation as the exact-mode passes apply it."""
    s = torch.zeros(numel, dtype=torch.float32, device=device)
    for c, z in zip(coeffs, zs):
        s = s + c * z
    return s


def invert(y: torch.Tensor, s: torch.Tensor, residues=None, bits: int = 0):
    """θ0 with round(θ0 + s) = y (flat tensors; y of θ's dtype, s fp32).  Returns (θ0, ambiguous).

    Candidates: with a plane, the grid points carrying the stored residue within
    2**bits of the estimate round(y − s); without one, the estimate and its two
    neighbours.  Of those that the forward rounding maps back to y, the one
    nearest the estimate wins; `ambiguous` marks elements where another
    candidate maps to y too (unresolved: the plane was too narrow, or absent).
    """
    dtype = y.dtype
    y_ord = to_ordered(y)
    est = to_ordered(_round_nearest(y.to(torch.float32) - s, dtype))
    if residues is None:
        cands = [est, est - 1, est + 1]
    else:
        m = (1 << bits) - 1
        base = est - ((est - residues) & m)
        cands = [base, base + (1 << bits), base - (1 << bits)]
    lim = 1 << (_WIDTH[dtype] - 1)
    best = est.clone()
    best_dist = torch.full_like(est, 1 << 40)
    hits = torch.zeros_like(est)
    for cand in cands:
        cand_c = cand.clamp(-lim, lim - 1)
        fwd = to_ordered(_round_nearest(from_ordered(cand_c, dtype).to(torch.float32) + s, dtype))
        ok = (cand == cand_c) & (fwd == y_ord)
        dist = (cand - est).abs()
        better = ok & (dist < best_dist)
        best = torch.where(better, cand_c, best)
        best_dist = torch.where(better, dist, best_dist)
        hits += ok.to(torch.int64)
    finite = torch.isfinite(y.to(torch.float32))
    theta0 = torch.where(finite, from_ordered(best, dtype), y)
    return theta0, (hits > 1) & finite


def noise_axpy_exact_reference(params, keys, alphas, undo, gamma, planes, plane_bits, rounding,
                               tensor_ids, offsets, rounding_key, noise="gaussian", scale=None):
    """The exact-restore form of the primitive, for every tensor t (z of the noise form `noise`,
    docs/spec.md §9; with `scale`, z_j is σ_t ⊙ z_j throughout, §10):

        θ0 ← the value with round(θ0 + Σ undo_j z_j) = θ_t      (skipped when undo is all zero)
        plane_t ← low plane_bits of θ0's grid position           (when undo is all zero and planes given)
        θ_t ← round(gamma·θ0 + Σ alphas_j z_j)                   (noise summed first, then added)

    When undo is non-zero and planes are given they are read to resolve ambiguous elements.
    """
    from .noise import random_words, stochastic_round

    inverting = any(u != 0.0 for u in undo)
    for i, p in enumerate(params):
        n, tid, off = p.numel(), tensor_ids[i], offsets[i]
        zs = [scaled(noise_values(noise, k, tid, n, offset=off, device=p.device), scale, i) for k in keys]
        y = p.reshape(-1)
        theta0 = y
        if inverting:
            res = unpack_residues(planes[i], n, off, plane_bits) if planes else None
            theta0, _ = invert(y, noise_sum(zs, undo, n, p.device), res, plane_bits)
        elif planes:
            r = to_ordered(theta0) & ((1 << plane_bits) - 1)
            planes[i].copy_(pack_residues(r, n, off, plane_bits))
        acc = theta0.to(torch.float32) * gamma + noise_sum(zs, alphas, n, p.device)
        if rounding == "stochastic" and p.dtype in DROPPED_BITS:
            out = stochastic_round(acc, p.dtype, random_words(rounding_key, tid, n, offset=off, device=p.device))
        else:
            out = acc.to(p.dtype)
        p.copy_(out.view_as(p))
