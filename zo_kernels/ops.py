"""The public primitive: validated wrappers around the `zo_kernels::noise_axpy_` custom op
(docs/spec.md §2, its rounding §3, its exact-restore form §4, its Rademacher form §9, its scaled form §10).

    noise_axpy_(params, keys, alphas, gamma=1, dense=None, beta=0, noise="gaussian", scale=None)
        θ_t ← gamma·θ_t + Σ_j alphas[j]·(σ_t ⊙ z(keys[j], t)) + beta·dense_t   for every tensor t
        (z: Gaussian, or with noise="rademacher" the signs s = ±1; σ_t = scale[t], 1 without it, §10)

All checks run before anything is written, so bad input leaves the weights
bit-identical.  The op itself only forwards to the chosen backend.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from . import backends as _backends
from .noise import default_stream
from .restore_args import check_exact_args
from .rounding import ROUNDINGS, check_rounding, default_rounding_key
from .validate import (
    FP32_MAX,
    OFFSET_LIMIT,
    PARAM_DTYPES,
    TENSOR_ID_LIMIT,
    check_index_list,
    check_key,
    check_no_overlap,
    check_noise,
    check_placement,
    check_scalar,
    check_scale,
    check_tensor,
    check_tensors,
    named_tensors,
)

__all__ = ["noise_axpy_", "noise_", "ROUNDINGS", "PARAM_DTYPES", "default_rounding_key"]


@torch.library.custom_op("zo_kernels::noise_axpy_", mutates_args=("params",))
def _noise_axpy_op(params: List[torch.Tensor], keys: List[int], alphas: List[float], gamma: float,
                   dense: List[torch.Tensor], beta: float, rounding: str, tensor_ids: List[int],
                   offsets: List[int], rounding_key: int, noise: str, scale: List[torch.Tensor],
                   backend: str) -> None:
    # An empty `dense` (`scale`) list means no dense term (σ = 1): the schema has no optional tensor lists.
    check_no_overlap(named_tensors(params, dense, scale=scale))  # here: real tensors under compile too
    _backends.require_noise(_backends.get(backend), noise)
    _backends.get(backend).axpy(params, list(keys), list(alphas), gamma, list(dense) or None, beta, rounding,
                                list(tensor_ids), list(offsets), rounding_key, noise, **_scale_kw(backend, scale))
    _backends._set_last(backend)


def _scale_kw(backend: str, scale) -> dict:
    """The scaled form's keyword for a backend's pass: only when there is a scale, so a backend without the
    scaled form keeps its signature (and is refused by name before it is reached)."""
    if not scale:
        return {}
    _backends.require_scale(_backends.get(backend), scale)
    return {"scale": list(scale)}


@_noise_axpy_op.register_fake
def _(params, keys, alphas, gamma, dense, beta, rounding, tensor_ids, offsets, rounding_key, noise, scale, backend):
    return None


@torch.library.custom_op("zo_kernels::noise_axpy_exact_", mutates_args=("params", "planes"))
def _noise_axpy_exact_op(params: List[torch.Tensor], keys: List[int], alphas: List[float], undo: List[float],
                         gamma: float, planes: List[torch.Tensor], plane_bits: int, rounding: str,
                         tensor_ids: List[int], offsets: List[int], rounding_key: int, noise: str,
                         scale: List[torch.Tensor], backend: str) -> None:
    check_no_overlap(named_tensors(params, planes=planes, scale=scale))
    _backends.require_noise(_backends.get(backend), noise)
    _backends.get(backend).axpy_exact(params, list(keys), list(alphas), list(undo), gamma, list(planes) or None,
                                      plane_bits, rounding, list(tensor_ids), list(offsets), rounding_key, noise,
                                      **_scale_kw(backend, scale))
    _backends._set_last(backend)


@_noise_axpy_exact_op.register_fake
def _(params, keys, alphas, undo, gamma, planes, plane_bits, rounding, tensor_ids, offsets, rounding_key, noise,
      scale, backend):
    return None


@torch.library.custom_op("zo_kernels::noise_", mutates_args=("out",))
def _noise_op(out: torch.Tensor, key: int, tensor_id: int, offset: int, stream: int, noise: str,
              backend: str) -> None:
    _backends.require_noise(_backends.get(backend), noise)
    _backends.get(backend).noise(out, key, tensor_id, offset, stream, noise)
    _backends._set_last(backend)


@_noise_op.register_fake
def _(out, key, tensor_id, offset, stream, noise, backend):
    return None


# ----------------------------------------------------------------- public API
def noise_axpy_(params, keys, alphas, *, gamma: float = 1.0, dense=None, beta: float = 0.0,
                rounding: str = "nearest", tensor_ids=None, offsets=None, rounding_key=None,
                backend: Optional[str] = None, undo=None, planes=None, noise: str = "gaussian",
                scale=None) -> None:
    """In place, for every tensor t: θ_t ← gamma·θ_t + Σ_j alphas[j]·(σ_t ⊙ z(keys[j], t)) + beta·dense_t.

    params      list of contiguous floating tensors on one device (fp32, bf16, fp16; fp64 via the reference)
    keys        64-bit Philox keys (unsigned or two's complement), one per alpha
    tensor_ids  the id t of each tensor in the noise counter (default: its position)
    offsets     global index of each tensor's first element (a shard of a larger tensor)
    rounding    "nearest" or "stochastic" (bf16/fp16: Philox stream 2 under rounding_key)
    backend     force "reference", "triton", "cpu", "cuda" (else $ZO_KERNELS_BACKEND, else the best)
    noise       "gaussian" (z, docs/spec.md §1) or "rademacher" (s = ±1, one bit per element, §9)
    scale       σ: one contiguous float32 or bfloat16 tensor per param, shaped like it, on its device (read only);
                None (the default) is σ = 1, bit-identical to the call without it (§10)

    Exact restore (zo_kernels.restore): `undo` gives, per key, the coefficient of the perturbation
    θ carries now (applied by an earlier call of this form with gamma=1 and nearest rounding); θ is
    first brought back to the value it had before that perturbation by inverting its rounding, then
    the new alphas apply to it.  `planes` (restore.make_planes) are written when undo is absent and
    read to resolve ambiguous elements when it is given.  No dense term in this form.  With `scale`, both
    the undone and the applied sums use σ ⊙ z: undo a scaled perturbation with the same σ.
    """
    params, dense = check_tensors(params, dense=dense)
    scale = check_scale(scale, params)
    # float64 params are computed by the reference in float64; everything else applies coefficients in fp32
    limit = math.inf if all(p.dtype == torch.float64 for p in params) else FP32_MAX
    if isinstance(keys, int) or (isinstance(keys, torch.Tensor) and keys.dim() == 0):
        keys = [keys]
    if isinstance(alphas, (int, float)) or (isinstance(alphas, torch.Tensor) and alphas.dim() == 0):
        alphas = [alphas]
    keys = [check_key(k, f"keys[{j}]") for j, k in enumerate(keys)]
    alphas = [check_scalar(a, f"alphas[{j}]", limit) for j, a in enumerate(alphas)]
    if len(keys) != len(alphas):
        raise ValueError(f"len(keys)={len(keys)} but len(alphas)={len(alphas)}: one coefficient per key")
    gamma = check_scalar(gamma, "gamma", limit)
    beta = check_scalar(beta, "beta", limit)
    check_rounding(rounding)
    check_noise(noise)
    n = len(params)
    tensor_ids, offsets = check_placement(tensor_ids, offsets, n)
    if rounding_key is None:
        rounding_key = default_rounding_key(keys, alphas, gamma, beta)
    rounding_key = check_key(rounding_key, "rounding_key")
    chosen = _backends.choose(params, backend)
    if scale is not None:
        _backends.require_scale(chosen, scale)
    if undo is not None or planes is not None:
        _exact(params, keys, alphas, undo, gamma, dense, planes, rounding, tensor_ids, offsets, rounding_key, noise,
               scale, chosen)
        return
    with torch.no_grad():
        _noise_axpy_op(params, keys, alphas, gamma, dense or [], beta, rounding, tensor_ids, offsets,
                       rounding_key, noise, scale or [], chosen.name)


def _exact(params, keys, alphas, undo, gamma, dense, planes, rounding, tensor_ids, offsets, rounding_key, noise,
           scale, chosen):
    if dense is not None:
        raise ValueError("the exact-restore form (undo/planes) takes no dense term")
    undo, planes, bits = check_exact_args(params, keys, undo, planes, offsets, chosen)
    with torch.no_grad():
        _noise_axpy_exact_op(params, keys, alphas, undo, gamma, planes or [], bits, rounding, tensor_ids, offsets,
                             rounding_key, noise, scale or [], chosen.name)


def noise_(out: torch.Tensor, key: int, tensor_id: int = 0, offset: int = 0, *, stream: Optional[int] = None,
           backend: Optional[str] = None, noise: str = "gaussian") -> torch.Tensor:
    """Fill `out` with the noise of key for tensor_id's elements offset .. offset+numel-1; returns out.

    noise="gaussian": z (docs/spec.md §1, stream 0 unless `stream` says otherwise); noise="rademacher":
    the signs s = ±1 (§9, stream 5 by default)."""
    check_tensor(out, "out")
    check_noise(noise)
    key = check_key(key, "key")
    tensor_id = check_index_list([tensor_id], 1, "tensor_id", None, 0, TENSOR_ID_LIMIT)[0]
    offset = check_index_list([offset], 1, "offset", None, 0, OFFSET_LIMIT)[0]
    stream = default_stream(noise) if stream is None else stream
    stream = check_index_list([stream], 1, "stream", None, 0, 1 << 32)[0]
    chosen = _backends.resolve(out.device, out.dtype, backend)
    with torch.no_grad():
        _noise_op(out, key, tensor_id, offset, stream, noise, chosen.name)
    return out
