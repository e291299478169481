"""Register every backend that can load here; record why the others cannot."""
from __future__ import annotations

import os

import torch

from . import backends
from .adam import noise_adam_reference
from .lowrank import lowrank_axpy_reference
from .noise import NOISE_FORMS, noise_axpy_reference, noise_reference
from .restore import noise_axpy_exact_reference
from .validate import SCALE_DTYPES

_ALL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})


def _register_reference() -> None:
    backends.register(backends.Backend("reference", ("cpu", "cuda"), _ALL_DTYPES,
                                       noise_axpy_reference, noise_reference,
                                       axpy_exact=noise_axpy_exact_reference, adam=noise_adam_reference,
                                       lowrank=lowrank_axpy_reference, noise_forms=NOISE_FORMS,
                                       scaled=frozenset({*SCALE_DTYPES, torch.float64})))


def _register_triton() -> None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        backends.register_unavailable("triton", ("cuda",), f"triton does not import: {e}")
        return
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    devices = tuple(d for d, ok in (("cuda", torch.cuda.is_available() and not interpret),
                                    ("cpu", interpret)) if ok)
    if not devices:
        backends.register_unavailable(
            "triton", ("cuda",), "no CUDA device; set TRITON_INTERPRET=1 before importing zo_kernels "
                                 "to run the Triton kernels on CPU under the interpreter")
        return
    from .triton import lowrank as tl_lowrank
    from .triton import noise_adam as ta
    from .triton import noise_axpy as tk
    backends.register(backends.Backend("triton", devices, tk.DTYPES, tk.noise_axpy, tk.noise,
                                       notes={"interpreter": interpret}, axpy_exact=tk.noise_axpy_exact,
                                       adam=ta.noise_adam, lowrank=tl_lowrank.lowrank_axpy,
                                       noise_forms=frozenset(NOISE_FORMS), scaled=frozenset(SCALE_DTYPES)))


def _register_native() -> None:
    """The C++ CPU kernel ("cpu", the default on CPU) and the CUDA C++ kernel ("cuda") of zo_kernels._C."""
    from . import native

    try:
        native.load()
    except Exception as e:  # not built (pure-Python install), or built against another torch
        reason = (f"the native extension zo_kernels._C does not load ({type(e).__name__}: {e}); "
                  f"build it with: pip install --no-build-isolation -e .")
        backends.register_unavailable("cpu", ("cpu",), reason)
        backends.register_unavailable("cuda", ("cuda",), reason)
        return
    backends.register(backends.Backend("cpu", ("cpu",), native.DTYPES, native.noise_axpy, native.noise,
                                       axpy_exact=native.noise_axpy_exact, adam=native.noise_adam,
                                       lowrank=native.lowrank_axpy, noise_forms=native.NOISE_FORMS,
                                       scaled=frozenset(SCALE_DTYPES), notes={"isa": native.cpu_isa()}))
    if not native.has_cuda():
        backends.register_unavailable("cuda", ("cuda",), "zo_kernels._C was built without CUDA "
                                      "(torch without CUDA, or nvcc/CUDA_HOME not found at build time)")
    elif not torch.cuda.is_available():
        backends.register_unavailable("cuda", ("cuda",), "no CUDA device")
    else:
        backends.register(backends.Backend("cuda", ("cuda",), native.DTYPES, native.noise_axpy, native.noise,
                                           axpy_exact=native.noise_axpy_exact, adam=native.noise_adam,
                                           lowrank=native.lowrank_axpy, noise_forms=native.NOISE_FORMS,
                                           scaled=frozenset(SCALE_DTYPES)))


def register_all() -> None:
    _register_reference()
    _register_triton()
    _register_native()
