"""The noise form of the ops (noise="gaussian" | "rademacher"): whether this build's noise_axpy_ has the
Rademacher form, and a skip mark for the tests that need it."""
import inspect

import pytest

import zo_kernels

RADEMACHER_OK = "noise" in inspect.signature(zo_kernels.noise_axpy_).parameters
needs_rademacher = pytest.mark.skipif(not RADEMACHER_OK,
                                      reason="needs noise='rademacher' in zo_kernels.noise_axpy_ (branch sign)")
