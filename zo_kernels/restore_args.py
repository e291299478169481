"""The exact-restore arguments (`undo`, `planes`) of noise_axpy_ and lowrank_noise_axpy_ (docs/spec.md §4),
checked before anything is written."""
from __future__ import annotations

import torch

from . import backends as _backends
from .restore import PLANE_BITS, PLANE_DTYPES, plane_numel_bytes
from .validate import check_scalar


def check_exact_args(params, keys, undo, planes, offsets, chosen):
    """The exact-restore arguments of noise_axpy_ / lowrank_noise_axpy_: (undo, planes, plane bits)."""
    wide = [p.dtype for p in params if p.dtype not in PLANE_DTYPES]
    if wide:
        raise TypeError(f"the exact-restore form (undo/planes) inverts float32/bfloat16/float16 rounding; got "
                        f"{wide[0]} params (float64 is computed exactly enough: use the plain form)")
    _backends.require(chosen, "axpy_exact", "does not implement exact restore (undo/planes)")
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
