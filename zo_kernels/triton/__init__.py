"""Triton kernels (CUDA GPUs; CPU under TRITON_INTERPRET=1)."""
import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    from ._interpreter_compat import fix_scalar_index

    fix_scalar_index()  # before any kernel runs: older interpreters fail on scalar loop bounds
