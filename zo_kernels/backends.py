"""Backend registry: which implementations of the primitive exist, and which one runs (docs/spec.md §2,
"Op and backends").

A backend is a pair of plain functions behind the one custom op:

    axpy(params, keys, alphas, gamma, dense, beta, rounding, tensor_ids, offsets, rounding_key, noise)
    noise(out, key, tensor_id, offset, stream, noise)
    axpy_exact(params, keys, alphas, undo, gamma, planes, plane_bits, rounding, tensor_ids, offsets,
               rounding_key, noise)                            (optional; see zo_kernels.restore)
    adam(params, exp_avgs, exp_avg_sqs, keys, coeffs, scalars, rounding, tensor_ids, offsets,
         rounding_key, noise)                                  (optional; see zo_kernels.adam)

`noise` is the noise form (docs/spec.md §9), "gaussian" when omitted; a backend lists the forms it
implements in `noise_forms`.  axpy and axpy_exact take a keyword `scale` (σ, one tensor per param,
docs/spec.md §10) only from backends whose `scaled` lists σ's dtype.
    lowrank(params, keys_u, key_v, alphas, undo, gamma, dense, beta, planes, plane_bits, rank, rounding,
            tensor_ids, offsets, rounding_key)                 (optional; see zo_kernels.lowrank)

Keys arrive as two's complement int64 Python ints (the form that crosses
torch.library).  Arguments are already validated by the public op (zo_kernels.ops, .adam, .lowrank).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ENV_VAR = "ZO_KERNELS_BACKEND"

# First available wins; the reference is last so a missing native backend is noticed.
PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


@dataclass
class Backend:
    name: str
    devices: tuple
    dtypes: frozenset
    axpy: Callable
    noise: Callable
    # Why it cannot run here, or None when it can.
    unavailable: Optional[str] = None
    # The exact-restore form (zo_kernels.restore), where the backend implements it.
    axpy_exact: Optional[Callable] = None
    # The fused ZO-Adam pass (zo_kernels.adam), where the backend implements it.
    adam: Optional[Callable] = None
    # The low-rank pass of zo_kernels.lowrank (tensors with ndim >= 2), where the backend implements it.
    lowrank: Optional[Callable] = None
    # The noise forms (zo_kernels.noise.NOISE_FORMS) its axpy, noise, axpy_exact and adam implement.
    noise_forms: frozenset = frozenset({"gaussian"})
    # The σ dtypes of the scaled form (docs/spec.md §10: axpy and axpy_exact with scale=), or None where the
    # backend does not implement it (scale= is then refused by name, never dropped).
    scaled: Optional[frozenset] = None
    notes: dict = field(default_factory=dict)


_REGISTRY: dict = {}
_WARNED: set = set()
_last_backend: Optional[str] = None


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def register_unavailable(name: str, devices: tuple, reason: str) -> None:
    """Record a backend that could not load, so errors and warnings can say why."""
    if name not in _REGISTRY:
        _REGISTRY[name] = Backend(name, devices, frozenset(), None, None, unavailable=reason)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_backends() -> list:
    """Names of the backends that can run on this machine."""
    return [n for n, b in _REGISTRY.items() if b.unavailable is None]


def backend_status() -> dict:
    """Every known backend and why it is unavailable (None when it runs)."""
    return {n: b.unavailable for n, b in _REGISTRY.items()}


def last_backend() -> Optional[str]:
    """The backend that ran the most recent noise_axpy_ / noise_ call."""
    return _last_backend


def _set_last(name: str) -> None:
    global _last_backend
    _last_backend = name


def choose(params, requested: Optional[str] = None) -> Backend:
    """The backend of one call on `params` (see `resolve`): one backend for all their dtypes."""
    dtypes = {p.dtype for p in params}
    chosen = {resolve(params[0].device, dt, requested).name for dt in dtypes}
    if len(chosen) > 1:
        # Only possible without an explicit request (float64 beside fp32, say): the reference
        # computes every dtype in one call.
        return get("reference")
    return get(chosen.pop())


def require(backend: Backend, capability: str, lacks: str) -> None:
    """Raise NotImplementedError when `backend` lacks an optional pass (`capability`: a field of
    Backend), naming the backends that have it; `lacks` says what is missing."""
    if getattr(backend, capability) is None:
        raise NotImplementedError(f"backend {backend.name!r} {lacks}; backends that do: "
                                  f"{[n for n in available_backends() if getattr(get(n), capability)]}")


def require_noise(backend: Backend, noise: str) -> None:
    """Raise NotImplementedError when `backend` lacks the noise form `noise` (never a silent fallback)."""
    if noise not in backend.noise_forms:
        raise NotImplementedError(f"backend {backend.name!r} does not implement noise={noise!r}; backends "
                                  f"that do: {[n for n in available_backends() if noise in get(n).noise_forms]}")


def require_scale(backend: Backend, scale) -> None:
    """Raise NotImplementedError when `backend` lacks the scaled form (scale=) for the dtype of any σ in
    `scale` (a list of tensors)."""
    for dtype in dict.fromkeys(s.dtype for s in scale):
        if backend.scaled is None or dtype not in backend.scaled:
            have = [n for n in available_backends() if get(n).scaled and dtype in get(n).scaled]
            raise NotImplementedError(f"backend {backend.name!r} does not implement scale= (the scaled form) with "
                                      f"{dtype} σ; backends that do: {have}")


def resolve(device: torch.device, dtype: torch.dtype, requested: Optional[str] = None) -> Backend:
    """Pick the backend for tensors on `device` of `dtype`.

    An explicit request (argument, else $ZO_KERNELS_BACKEND) must be usable or
    it is an error.  Otherwise the preference order of the device is walked,
    and skipping a preferred backend is announced once, loudly.
    """
    requested = requested or os.environ.get(ENV_VAR) or None
    kind = device.type
    if requested is not None:
        b = get(requested)
        if b.unavailable is not None:
            raise RuntimeError(f"backend {requested!r} was requested but is unavailable: {b.unavailable}")
        if kind not in b.devices:
            raise ValueError(f"backend {requested!r} runs on {b.devices}, not on {kind} tensors")
        if dtype not in b.dtypes:
            raise TypeError(f"backend {requested!r} does not support {dtype}; it supports "
                            f"{sorted(str(d) for d in b.dtypes)}")
        return b
    if dtype == torch.float64:
        # float64 is the precision oracle's dtype: only the reference computes in it.
        return get("reference")
    for name in PREFERENCE.get(kind, ("reference",)):
        b = _REGISTRY.get(name)
        if b is None or b.unavailable is not None or kind not in b.devices or dtype not in b.dtypes:
            reason = "not registered" if b is None else (b.unavailable or f"no {kind}/{dtype} support")
            if name != "reference" and (name, kind) not in _WARNED:
                _WARNED.add((name, kind))
                warnings.warn(f"zo_kernels: backend {name!r} is unavailable for {kind} tensors ({reason}); "
                              f"falling back to the next one. zo_kernels.available_backends() lists what runs.",
                              RuntimeWarning, stacklevel=4)
            continue
        return b
    raise RuntimeError(f"no zo_kernels backend can run on {kind} tensors of {dtype}")
