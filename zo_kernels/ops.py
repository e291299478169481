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
from .noise import M64, STREAM_NOISE, float_bits, mix_keys, to_signed64

ROUNDINGS = ("nearest", "stochastic")
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@torch.library.custom_op("zo_kernels::noise_axpy_", mutates_args=("params",))
def _noise_axpy_op(params: List[torch.Tensor], keys: List[int], alphas: List[float], gamma: float,
                   dense: List[torch.Tensor], beta: float, rounding: str, tensor_ids: List[int],
                   offsets: List[int], rounding_key: int, backend: str) -> None:
    # An empty `dense` list means no dense term (the schema has no optional tensor lists).
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
def _check_key(k, name: str) -> int:
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int (a 64-bit key), got {type(k).__name__}")
    if not -(1 << 63) <= k <= M64:
        raise ValueError(f"{name}={k} does not fit in 64 bits")
    return to_signed64(k & M64)


def _check_scalar(x, name: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} is {x}: coefficients must be finite")
    return x


def _check_tensor(t, name: str, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; only floating-point tensors can be perturbed")
    if t.dtype not in PARAM_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16, float64")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                         f"call .contiguous() on the parameter first")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but params[0] is on {device}: all tensors must share a device")
    if t.requires_grad and not t.is_leaf:
        raise ValueError(f"{name} is a non-leaf tensor that requires grad; in-place noise would corrupt "
                         f"the autograd graph. Pass the leaf parameters.")
    return t


def _check_params(params, name="params") -> list:
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError(f"{name} is empty: nothing to perturb")
    device = None
    seen = {}
    for i, p in enumerate(params):
        _check_tensor(p, f"{name}[{i}]", device)
        device = p.device
        if p.numel():
            ptr = p.data_ptr()
            if ptr in seen:
                raise ValueError(f"{name}[{i}] and {name}[{seen[ptr]}] share memory; pass each tensor once "
                                 f"(tied weights are perturbed once)")
            seen[ptr] = i
    return params


def _check_index_list(values, n: int, name: str, default, lo: int, hi: int) -> list:
    if values is None:
        return list(default)
    values = [int(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} params")
    for i, v in enumerate(values):
        if not lo <= v < hi:
            raise ValueError(f"{name}[{i}]={v} is outside [{lo}, {hi})")
    return values


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
    params = _check_params(params)
    if isinstance(keys, int) or (isinstance(keys, torch.Tensor) and keys.dim() == 0):
        keys = [keys]
    if isinstance(alphas, (int, float)) or (isinstance(alphas, torch.Tensor) and alphas.dim() == 0):
        alphas = [alphas]
    keys = [_check_key(k, f"keys[{j}]") for j, k in enumerate(keys)]
    alphas = [_check_scalar(a, f"alphas[{j}]") for j, a in enumerate(alphas)]
    if len(keys) != len(alphas):
        raise ValueError(f"len(keys)={len(keys)} but len(alphas)={len(alphas)}: one coefficient per key")
    gamma = _check_scalar(gamma, "gamma")
    beta = _check_scalar(beta, "beta")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if dense is not None:
        if isinstance(dense, torch.Tensor):
            dense = [dense]
        dense = list(dense)
        if len(dense) != len(params):
            raise ValueError(f"dense has {len(dense)} tensors for {len(params)} params")
        for i, (d, p) in enumerate(zip(dense, params)):
            _check_tensor(d, f"dense[{i}]", p.device)
            if d.shape != p.shape:
                raise ValueError(f"dense[{i}] has shape {tuple(d.shape)} but params[{i}] has {tuple(p.shape)}")
    n = len(params)
    tensor_ids = _check_index_list(tensor_ids, n, "tensor_ids", range(n), 0, 1 << 32)
    offsets = _check_index_list(offsets, n, "offsets", [0] * n, 0, 1 << 62)
    if rounding_key is None:
        rounding_key = default_rounding_key(keys, alphas, gamma, beta)
    rounding_key = _check_key(rounding_key, "rounding_key")
    chosen = _pick_backend(params, backend)
    if undo is not None or planes is not None:
        _exact(params, keys, alphas, undo, gamma, dense, planes, rounding, tensor_ids, offsets, rounding_key, chosen)
        return
    with torch.no_grad():
        _noise_axpy_op(params, keys, alphas, gamma, dense or [], beta, rounding, tensor_ids, offsets,
                       rounding_key, chosen.name)


def check_exact_args(params, keys, undo, planes, offsets, chosen):
    """The exact-restore arguments of noise_axpy_ / lowrank_noise_axpy_: (undo, planes, plane bits)."""
    from .restore import PLANE_BITS, plane_numel_bytes

    if chosen.axpy_exact is None:
        raise NotImplementedError(f"backend {chosen.name!r} does not implement exact restore (undo/planes); "
                                  f"backends that do: {[n for n in _backends.available_backends() if _backends.get(n).axpy_exact]}")
    undo = [0.0] * len(keys) if undo is None else [_check_scalar(u, f"undo[{j}]") for j, u in enumerate(undo)]
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
    _check_tensor(out, "out")
    key = _check_key(key, "key")
    tensor_id = _check_index_list([tensor_id], 1, "tensor_id", None, 0, 1 << 32)[0]
    offset = _check_index_list([offset], 1, "offset", None, 0, 1 << 62)[0]
    stream = _check_index_list([stream], 1, "stream", None, 0, 1 << 32)[0]
    chosen = _backends.resolve(out.device, out.dtype, backend)
    with torch.no_grad():
        _noise_op(out, key, tensor_id, offset, stream, chosen.name)
    return out
