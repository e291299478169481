"""The public primitive: validated wrappers around the `zo_kernels::noise_axpy_` custom op.

    noise_axpy_(params, keys, alphas, gamma=1, dense=None, beta=0)
        θ_t ← gamma·θ_t + Σ_j alphas[j]·z(keys[j], t) + beta·dense_t   for every tensor t

All checks run before anything is written, so bad input leaves the weights
bit-identical.  The op itself only forwards to the chosen backend.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from . import backends as _backends
from .noise import STREAM_NOISE, float_bits, mix_keys
from .validate import (
    FP32_MAX,
    PARAM_DTYPES,
    check_index_list,
    check_key,
    check_no_overlap,
    check_scalar,
    check_tensor,
    check_tensor_list,
    check_tensors,
    named_tensors,
)

ROUNDINGS = ("nearest", "stochastic")
__all__ = ["noise_axpy_", "noise_", "ROUNDINGS", "PARAM_DTYPES", "default_rounding_key"]


@torch.library.custom_op("zo_kernels::noise_axpy_", mutates_args=("params",))
def _noise_axpy_op(params: List[torch.Tensor], keys: List[int], alphas: List[float], gamma: float,
                   dense: List[torch.Tensor], beta: float, rounding: str, tensor_ids: List[int],
                   offsets: List[int], rounding_key: int, backend: str) -> None:
    # An empty `dense` list means no dense term (the schema has no optional tensor lists).
    check_no_overlap(named_tensors(params, dense))     # here, not in the wrapper: real tensors under compile too
    _backends.get(backend).axpy(params, list(keys), list(alphas), gamma, list(dense) or None, beta, rounding,
                                list(tensor_ids), list(offsets), rounding_key)
    _backends._set_last(backend)


@_noise_axpy_op.register_fake
def _(params, keys, alphas, gamma, dense, beta, rounding, tensor_ids, offsets, rounding_key, backend):
    return None


@torch.library.custom_op("zo_kernels::noise_axpy_exact_", mutates_args=("params", "planes"))
def _noise_axpy_exact_op(params: List[torch.Tensor], keys: List[int], alphas: List[float], undo: List[float],
                         gamma: float, planes: List[torch.Tensor], plane_bits: int, rounding: str,
                         tensor_ids: List[int], offsets: List[int], rounding_key: int, backend: str) -> None:
    check_no_overlap(named_tensors(params, planes=planes))
    _backends.get(backend).axpy_exact(params, list(keys), list(alphas), list(undo), gamma, list(planes) or None,
                                      plane_bits, rounding, list(tensor_ids), list(offsets), rounding_key)
    _backends._set_last(backend)


@_noise_axpy_exact_op.register_fake
def _(params, keys, alphas, undo, gamma, planes, plane_bits, rounding, tensor_ids, offsets, rounding_key, backend):
    return None


@torch.library.custom_op("zo_kernels::noise_", mutates_args=("out",))
def _noise_op(out: torch.Tensor, key: int, tensor_id: int, offset: int, stream: int, backend: str) -> None:
    _backends.get(backend).noise(out, key, tensor_id, offset, stream)
    _backends._set_last(backend)


@_noise_op.register_fake
def _(out, key, tensor_id, offset, stream, backend):
    return None


# ------------------------------------------------------------------ validation
# The checks live in zo_kernels.validate, shared by every op; these names are the ones the other
# ops' modules (adam.py, lowrank.py) import from here.
_check_key, _check_scalar, _check_tensor, _check_index_list = check_key, check_scalar, check_tensor, check_index_list


def _check_params(params, name: str = "params") -> list:
    """A list of tensors an op writes: validate.check_tensor_list, and no two share a byte (eager; the
    custom op's body checks again with real tensors under torch.compile)."""
    params = check_tensor_list(params, name)
    if not torch.compiler.is_compiling():
        check_no_overlap([(f"{name}[{i}]", p, True) for i, p in enumerate(params)])
    return params


def _pick_backend(params, backend: Optional[str]):
    dtypes = {p.dtype for p in params}
    chosen = {_backends.resolve(params[0].device, dt, backend).name for dt in dtypes}
    if len(chosen) > 1:
        # Only possible without an explicit request (float64 beside fp32, say): the reference
        # computes every dtype in one call.
        return _backends.get("reference")
    return _backends.get(chosen.pop())


def default_rounding_key(keys: Sequence[int], alphas: Sequence[float], gamma: float, beta: float) -> int:
    """Stochastic-rounding key derived from the call itself: reproducible, and new for every distinct call."""
    return mix_keys(0x5EED5EED, *keys, *(float_bits(a) for a in alphas), float_bits(gamma), float_bits(beta))


# ----------------------------------------------------------------- public API
def noise_axpy_(params, keys, alphas, *, gamma: float = 1.0, dense=None, beta: float = 0.0,
                rounding: str = "nearest", tensor_ids=None, offsets=None, rounding_key=None,
                backend: Optional[str] = None, undo=None, planes=None) -> None:
    """In place, for every tensor t: θ_t ← gamma·θ_t + Σ_j alphas[j]·z(keys[j], t) + beta·dense_t.

    params      list of contiguous floating tensors on one device (fp32, bf16, fp16; fp64 via the reference)
    keys        64-bit Philox keys (unsigned or two's complement), one per alpha
    tensor_ids  the id t of each tensor in the noise counter (default: its position)
    offsets     global index of each tensor's first element (a shard of a larger tensor)
    rounding    "nearest" or "stochastic" (bf16/fp16: Philox stream 2 under rounding_key)
    backend     force "reference", "triton", "cpu", "cuda" (else $ZO_KERNELS_BACKEND, else the best)

    Exact restore (zo_kernels.restore): `undo` gives, per key, the coefficient of the perturbation
    θ carries now (applied by an earlier call of this form with gamma=1 and nearest rounding); θ is
    first brought back to the value it had before that perturbation by inverting its rounding, then
    the new alphas apply to it.  `planes` (restore.make_planes) are written when undo is absent and
    read to resolve ambiguous elements when it is given.  No dense term in this form.
    """
    params, dense = check_tensors(params, dense=dense)
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
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    n = len(params)
    tensor_ids = check_index_list(tensor_ids, n, "tensor_ids", range(n), 0, 1 << 32)
    offsets = check_index_list(offsets, n, "offsets", [0] * n, 0, 1 << 62)
    if rounding_key is None:
        rounding_key = default_rounding_key(keys, alphas, gamma, beta)
    rounding_key = check_key(rounding_key, "rounding_key")
    chosen = _pick_backend(params, backend)
    if undo is not None or planes is not None:
        _exact(params, keys, alphas, undo, gamma, dense, planes, rounding, tensor_ids, offsets, rounding_key, chosen)
        return
    with torch.no_grad():
        _noise_axpy_op(params, keys, alphas, gamma, dense or [], beta, rounding, tensor_ids, offsets,
                       rounding_key, chosen.name)


def check_exact_args(params, keys, undo, planes, offsets, chosen):
    """The exact-restore arguments of noise_axpy_ / lowrank_noise_axpy_: (undo, planes, plane bits)."""
    from .restore import PLANE_BITS, PLANE_DTYPES, plane_numel_bytes

    wide = [p.dtype for p in params if p.dtype not in PLANE_DTYPES]
    if wide:
        raise TypeError(f"the exact-restore form (undo/planes) inverts float32/bfloat16/float16 rounding; got "
                        f"{wide[0]} params (float64 is computed exactly enough: use the plain form)")
    if chosen.axpy_exact is None:
        raise NotImplementedError(f"backend {chosen.name!r} does not implement exact restore (undo/planes); "
                                  f"backends that do: {[n for n in _backends.available_backends() if _backends.get(n).axpy_exact]}")
    if undo is not None and (isinstance(undo, (str, bytes)) or not hasattr(undo, "__len__")):
        raise TypeError(f"undo must be a list of coefficients, one per key, got {type(undo).__name__}")
    undo = [0.0] * len(keys) if undo is None else [check_scalar(u, f"undo[{j}]") for j, u in enumerate(undo)]
    if len(undo) != len(keys):
        raise ValueError(f"undo has {len(undo)} coefficients for {len(keys)} keys")
    bits = 2
    if planes is not None:
        planes = list(planes)
        if len(planes) != len(params):
            raise ValueError(f"planes has {len(planes)} tensors for {len(params)} params")
        sizes = []
        for i, (pl, p) in enumerate(zip(planes, params)):
            if not isinstance(pl, torch.Tensor) or pl.dtype != torch.uint8 or not pl.is_contiguous():
                raise TypeError(f"planes[{i}] must be a contiguous uint8 tensor from zo_kernels.restore.make_planes")
            if pl.device != p.device:
                raise ValueError(f"planes[{i}] is on {pl.device}, params[{i}] on {p.device}")
            sizes.append((pl.numel(), plane_numel_bytes(p.numel(), offsets[i], 2)))
        live = [(have, unit) for have, unit in sizes if unit]
        if live:
            bits = 2 * live[0][0] // live[0][1]
            if bits not in PLANE_BITS or any(have != unit * bits // 2 for have, unit in live):
                raise ValueError("planes do not match the params' sizes (make them with restore.make_planes)")
    return undo, planes, bits


def _exact(params, keys, alphas, undo, gamma, dense, planes, rounding, tensor_ids, offsets, rounding_key, chosen):
    if dense is not None:
        raise ValueError("the exact-restore form (undo/planes) takes no dense term")
    undo, planes, bits = check_exact_args(params, keys, undo, planes, offsets, chosen)
    with torch.no_grad():
        _noise_axpy_exact_op(params, keys, alphas, undo, gamma, planes or [], bits, rounding, tensor_ids, offsets,
                             rounding_key, chosen.name)


def noise_(out: torch.Tensor, key: int, tensor_id: int = 0, offset: int = 0, *, stream: int = STREAM_NOISE,
           backend: Optional[str] = None) -> torch.Tensor:
    """Fill `out` with z(key, tensor_id) for its elements offset .. offset+numel-1; returns out."""
    check_tensor(out, "out")
    key = check_key(key, "key")
    tensor_id = check_index_list([tensor_id], 1, "tensor_id", None, 0, 1 << 32)[0]
    offset = check_index_list([offset], 1, "offset", None, 0, 1 << 62)[0]
    stream = check_index_list([stream], 1, "stream", None, 0, 1 << 32)[0]
    chosen = _backends.resolve(out.device, out.dtype, backend)
    with torch.no_grad():
        _noise_op(out, key, tensor_id, offset, stream, chosen.name)
    return out
