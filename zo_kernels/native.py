"""The native backends "cpu" (C++, csrc/cpu) and "cuda" (CUDA C++, csrc/cuda): Python glue (the ops of
docs/spec.md §2, §4, §7, §8).

Both are the ops of the extension zo_kernels._C, built from source by setup.py:

    zo_kernels::_noise_axpy_native(params, keys, alphas, gamma, dense, beta, stochastic,
                                   tensor_ids, offsets, rounding_key, noise, scale)
    zo_kernels::_noise_native(out, key, tensor_id, offset, stream, noise)
    zo_kernels::_noise_axpy_exact_native(params, keys, alphas, undo, gamma, planes, plane_bits, stochastic,
                                         tensor_ids, offsets, rounding_key, noise, scale)
    zo_kernels::_lowrank_axpy_native(params, keys_u, key_v, alphas, undo, gamma, dense, beta, planes,
                                     plane_bits, rank, stochastic, tensor_ids, offsets, rounding_key)
    zo_kernels::_noise_adam_native(params, exp_avgs, exp_avg_sqs, keys, coeffs, scalars, stochastic,
                                   tensor_ids, offsets, rounding_key, noise)

`scale` (last, default empty) is the scaled form's σ (docs/spec.md §10): float32, one per param, in both
kernels.  `noise` is the noise form as an int (NOISE_CODES; csrc/philox.h NOISE_GAUSSIAN / NOISE_RADEMACHER, docs/spec.md
§9); the low-rank pass is Gaussian only.

The third is the exact-restore form (zo_kernels.restore is its reference; the per-element rules are
csrc/restore.h, shared by both kernels); the last is the fused ZO-Adam pass (zo_kernels.adam is its
reference, csrc/adam.h the per-element rule); _lowrank_axpy_native is the low-rank
pass (zo_kernels.lowrank is its reference; csrc/cpu/lowrank_cpu.cpp and csrc/cuda/lowrank_kernel.cu).

The dispatcher sends CPU tensors to the CPU kernel and CUDA tensors to the CUDA kernel, so one pair
of functions serves both backends.  Arguments arrive validated by zo_kernels.ops (keys as two's
complement int64).  Each kernel covers every tensor of the list in one pass (one parallel loop on
CPU, one launch per dtype pair on CUDA), regenerating z from csrc/philox.h.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator, List

import torch

DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
NOISE_CODES = {"gaussian": 0, "rademacher": 1}   # the native ops' `noise` argument (csrc/philox.h)
NOISE_FORMS = frozenset(NOISE_CODES)


def load():
    """Import the extension (registers the ops); raises ImportError/OSError when it is missing or broken."""
    importlib.import_module(f"{__package__}._C")
    return torch.ops.zo_kernels


def noise_axpy(params, keys, alphas, gamma, dense, beta, rounding, tensor_ids, offsets, rounding_key, noise="gaussian",
               scale=None):
    torch.ops.zo_kernels._noise_axpy_native(params, list(keys), [float(a) for a in alphas], float(gamma),
                                            list(dense) if dense is not None else [], float(beta),
                                            int(rounding == "stochastic"), list(tensor_ids), list(offsets),
                                            int(rounding_key), NOISE_CODES[noise], list(scale or []))


def noise_axpy_exact(params, keys, alphas, undo, gamma, planes, plane_bits, rounding, tensor_ids, offsets,
                     rounding_key, noise="gaussian", scale=None):
    torch.ops.zo_kernels._noise_axpy_exact_native(params, list(keys), [float(a) for a in alphas],
                                                  [float(u) for u in undo], float(gamma),
                                                  list(planes) if planes else [], int(plane_bits),
                                                  int(rounding == "stochastic"), list(tensor_ids), list(offsets),
                                                  int(rounding_key), NOISE_CODES[noise], list(scale or []))


def noise_adam(params, exp_avgs, exp_avg_sqs, keys, coeffs, scalars, rounding, tensor_ids, offsets, rounding_key,
               noise="gaussian"):
    torch.ops.zo_kernels._noise_adam_native(params, exp_avgs, exp_avg_sqs, list(keys), [float(c) for c in coeffs],
                                            [float(s) for s in scalars.as_list()], int(rounding == "stochastic"),
                                            list(tensor_ids), list(offsets), int(rounding_key), NOISE_CODES[noise])
def lowrank_axpy(params, keys_u, key_v, alphas, undo, gamma, dense, beta, planes, plane_bits, rank, rounding,
                 tensor_ids, offsets, rounding_key):
    """The low-rank pass (zo_kernels.lowrank) on tensors with ndim >= 2: csrc/cpu/lowrank_cpu.cpp, csrc/cuda."""
    torch.ops.zo_kernels._lowrank_axpy_native(params, list(keys_u), int(key_v), [float(a) for a in alphas],
                                              [float(u) for u in undo] if undo is not None else [], float(gamma),
                                              list(dense) if dense else [], float(beta),
                                              list(planes) if planes else [], int(plane_bits), int(rank),
                                              int(rounding == "stochastic"), list(tensor_ids), list(offsets),
                                              int(rounding_key))


def noise(out, key, tensor_id, offset, stream, noise="gaussian"):
    torch.ops.zo_kernels._noise_native(out, int(key), int(tensor_id), int(offset), int(stream), NOISE_CODES[noise])


def cpu_isa(request: str = "") -> str:
    """The instruction set of the CPU kernel ("avx512", "avx2", "base"); a name selects it.

    Every instruction set computes the same bits (no fused multiply-adds); tests check that.
    """
    return torch.ops.zo_kernels._native_cpu_isa(request)


ISAS = ("base", "avx2", "avx512")   # the CPU kernel's instruction-set builds, narrowest first


def cpu_isas() -> List[str]:
    """The instruction sets this CPU can run the kernel with, baseline first (the last is the default)."""
    return list(ISAS[:ISAS.index(cpu_isa()) + 1])


@contextlib.contextmanager
def on_isa(isa: str) -> Iterator[str]:
    """The CPU kernels on instruction set `isa` inside the block (tests, benchmarks); the previous
    choice restored after."""
    before = cpu_isa()
    cpu_isa(isa)
    try:
        yield isa
    finally:
        cpu_isa(before)


def has_cuda() -> bool:
    """Whether the extension was built with its CUDA kernel."""
    return bool(torch.ops.zo_kernels._native_has_cuda())
