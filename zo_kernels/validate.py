"""Argument checks of the public ops, in one place: every call is checked before anything is written
(docs/spec.md §2, "Validation contract").

An op that writes tensors in place validates them with `check_tensors` or `check_params` (layout,
dtype, device, autograd, inference tensors) and, first thing in its custom op's body,
`check_no_overlap` (every written tensor against every other tensor of the call, by byte range),
its coefficients with `check_scalar`, its keys with `check_key` and its integer lists with
`check_index_list`.  A new op reuses these (and zo_kernels.rounding, .restore_args, .backends'
`choose`), so that "bad input raises before anything is written, naming the argument" holds for
all of them.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch

from .noise import M64, NOISE_FORMS, to_signed64

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FP32_MAX = float(torch.finfo(torch.float32).max)


def check_key(k, name: str) -> int:
    """A 64-bit Philox key (unsigned, or two's complement), as the signed int64 the ops carry."""
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point() and k.dtype != torch.bool:
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int (a 64-bit key), got {type(k).__name__}")
    k = int(k)
    if not -(1 << 63) <= k <= M64:
        raise ValueError(f"{name}={k} does not fit in 64 bits")
    return to_signed64(k & M64)


def check_noise(noise) -> str:
    """The `noise=` keyword of the ops: one of NOISE_FORMS (docs/spec.md §9)."""
    if not isinstance(noise, str) or noise not in NOISE_FORMS:
        raise ValueError(f"noise must be one of {NOISE_FORMS}, got {noise!r}")
    return noise


def check_int(value, name: str, lo: int, hi: int) -> int:
    """A Python int (not a bool) in [lo, hi]: a size or a count the ops and optimizers take."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is outside [{lo}, {hi}]")
    return value


def check_scalar(x, name: str, limit: float = FP32_MAX) -> float:
    """A finite real coefficient (not a bool or a string) of magnitude <= limit (default: it is
    applied in float32, where a larger value would overflow to inf)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be a real number, got a {x.dtype} tensor")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} is {x}: coefficients must be finite")
    if abs(x) > limit:
        raise ValueError(f"{name}={x} exceeds the float32 range (|x| <= {limit:.4g}): the kernels apply "
                         f"coefficients in float32, where it would overflow to inf")
    return x


def check_index_list(values, n: int, name: str, default, lo: int, hi: int) -> list:
    """n integers in [lo, hi) (a float such as 0.5 is refused, never truncated); `default` if None."""
    if values is None:
        return list(default)
    if isinstance(values, torch.Tensor):
        values = values.tolist() if values.dim() else [values.item()]
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} params")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}[{i}] must be an int, got {type(v).__name__} {v!r}")
        v = int(v)
        if not lo <= v < hi:
            raise ValueError(f"{name}[{i}]={v} is outside [{lo}, {hi})")
        out.append(v)
    return out


# The noise counter's placement fields (docs/spec.md): a tensor id is 32 bits, an element offset 62.
TENSOR_ID_LIMIT = 1 << 32
OFFSET_LIMIT = 1 << 62


def check_placement(tensor_ids, offsets, n: int) -> tuple:
    """(tensor_ids, offsets) of n tensors, each in its counter field's range; None: 0..n-1 and all 0."""
    return (check_index_list(tensor_ids, n, "tensor_ids", range(n), 0, TENSOR_ID_LIMIT),
            check_index_list(offsets, n, "offsets", [0] * n, 0, OFFSET_LIMIT))


def check_tensor(t, name: str, device=None, *, written: bool = True, dtypes=PARAM_DTYPES) -> torch.Tensor:
    """One tensor argument: a dense, contiguous floating tensor of a supported dtype on `device`;
    if the op writes it, also not a non-leaf that requires grad and not an inference tensor
    outside inference mode (both are errors torch itself raises for in-place updates)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor; noise ops need dense (strided) tensors: "
                        f"call .to_dense() first")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; only floating-point tensors can be perturbed")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d)[6:] for d in dtypes)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                         f"call .contiguous() on the parameter first")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but params[0] is on {device}: all tensors must share a device")
    if written:
        if t.requires_grad and not t.is_leaf:
            raise ValueError(f"{name} is a non-leaf tensor that requires grad; in-place noise would corrupt "
                             f"the autograd graph. Pass the leaf parameters.")
        # (dynamo cannot trace is_inference(); a compiled graph has its own inference-mode rules)
        if not torch.compiler.is_compiling() and t.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"{name} is an inference tensor (created under torch.inference_mode()); "
                               f"updating it in place outside inference mode is not allowed: clone it, or "
                               f"make the call inside torch.inference_mode()")
    return t


def check_tensor_list(tensors, name: str, device=None, *, written: bool = True, n: Optional[int] = None,
                      allow_empty: bool = False) -> List[torch.Tensor]:
    """A list (or one tensor) of tensors, each checked by `check_tensor`; all on one device."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors and not allow_empty:
        raise ValueError(f"{name} is empty: nothing to perturb")
    if n is not None and len(tensors) != n:
        raise ValueError(f"{name} has {len(tensors)} tensors for {n} params")
    for i, t in enumerate(tensors):
        check_tensor(t, f"{name}[{i}]", device, written=written)
        device = t.device
    return tensors


def _span(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()     # contiguous: exactly these bytes


def check_no_overlap(named: Sequence[Tuple[str, torch.Tensor, bool]]) -> None:
    """(name, tensor, written) triples: raise, naming both, if a written tensor shares a byte with any
    other tensor of the call (views of one storage, a dense term overlapping a parameter, ...).
    Read-only tensors may overlap each other.  One sort and one sweep over the byte ranges."""
    spans = sorted(((s, name, w) for name, t, w in named if (s := _span(t)) is not None), key=lambda x: x[0][0])
    last_any = last_written = None      # the span reaching furthest so far, among all / written ones
    for (start, end), name, written in spans:
        other = last_any if written else last_written
        if other is not None and other[0][1] > start:
            (o_start, o_end), o_name, _ = other
            raise ValueError(f"{o_name} and {name} share memory (bytes [{o_start:#x}, {o_end:#x}) and "
                             f"[{start:#x}, {end:#x}) overlap); pass each tensor once (tied weights are "
                             f"perturbed once), and no tensor that views another one's memory")
        cur = ((start, end), name, written)
        if last_any is None or end > last_any[0][1]:
            last_any = cur
        if written and (last_written is None or end > last_written[0][1]):
            last_written = cur


def named_tensors(params, dense=None, planes=None, written=(), scale=None) -> List[Tuple[str, torch.Tensor, bool]]:
    """The (name, tensor, written) triples of an op's tensor arguments, for `check_no_overlap`;
    `written`: more (name, tensor list) pairs the op writes (e.g. Adam's exp_avgs, exp_avg_sqs)."""
    named = [(f"params[{i}]", p, True) for i, p in enumerate(params)]
    # dense[i] may be params[i] itself (same bytes, same dtype): each element is read before it is
    # written, by the same thread.  Its bytes are checked as params[i]'s.
    named += [(f"dense[{i}]", d, False) for i, (d, p) in enumerate(zip(dense or [], params))
              if not (d.dtype == p.dtype and d.numel() == p.numel() and _span(d) == _span(p))]
    named += [(f"planes[{i}]", t, True) for i, t in enumerate(planes or [])]
    named += [(f"scale[{i}]", t, False) for i, t in enumerate(scale or [])]
    for name, ts in written:
        named += [(f"{name}[{i}]", t, True) for i, t in enumerate(ts)]
    return named


def check_tensors(params, name: str = "params", *, dense=None):
    """The tensor arguments of an in-place op: `params` (written) and an optional `dense` list (read,
    one per param, same shapes).  Returns (params, dense or None).  Raises before anything is written.

    Overlap is checked by `check_no_overlap(named_tensors(...))` in the custom op's body, where the
    tensors are real also under torch.compile (dynamo traces fake tensors without addresses)."""
    params = check_tensor_list(params, name)
    if dense is not None:
        dense = check_tensor_list(dense, "dense", params[0].device, written=False, n=len(params))
        for i, (d, p) in enumerate(zip(dense, params)):
            if d.shape != p.shape:
                raise ValueError(f"dense[{i}] has shape {tuple(d.shape)} but {name}[{i}] has {tuple(p.shape)}")
    return params, dense


SCALE_DTYPES = (torch.float32, torch.bfloat16)    # σ of the scaled form (docs/spec.md §10)


def check_scale(scale, params) -> Optional[List[torch.Tensor]]:
    """The scaled form's σ (docs/spec.md §10): None, or one contiguous float32 / bfloat16 tensor per param with its
    shape, on its device (float64 params: float64 σ, computed by the reference).  Read only."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        scale = [scale]
    scale = list(scale)
    if len(scale) != len(params):
        raise ValueError(f"scale has {len(scale)} tensors for {len(params)} params: one σ per param, shaped like it")
    for i, (s, p) in enumerate(zip(scale, params)):
        want = (torch.float64,) if p.dtype == torch.float64 else SCALE_DTYPES
        check_tensor(s, f"scale[{i}]", p.device, written=False, dtypes=want)
        if s.shape != p.shape:
            raise ValueError(f"scale[{i}] has shape {tuple(s.shape)} but params[{i}] has {tuple(p.shape)}")
    return scale


def check_params(params, name: str = "params") -> list:
    """A list of tensors an op writes: check_tensor_list, and no two share a byte (eager; the
    custom op's body checks again with real tensors under torch.compile)."""
    params = check_tensor_list(params, name)
    if not torch.compiler.is_compiling():
        check_no_overlap([(f"{name}[{i}]", p, True) for i, p in enumerate(params)])
    return params
