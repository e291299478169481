"""On a CUDA GPU, what is specific to the compiled Triton kernel: it is the default, and it allocates
nothing.  The backend contract (against the reference) is tests/test_backend_conformance.py."""
import pytest
import torch

import zo_kernels
from zo_kernels import noise as N

from helpers import assert_verbose_allclose
from native_helpers import rademacher_workload

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

KEYS = [N.step_key(3, s) for s in range(4)]
ALPHAS = [1e-3, -2e-3, 0.5, -0.75]


def test_noise_on_gpu_within_spec_bound():
    out = torch.empty(1 << 20, device="cuda")
    zo_kernels.noise_(out, KEYS[0], 7, offset=12)
    assert zo_kernels.last_backend() == "triton"
    assert_verbose_allclose(out.cpu(), N.normal(KEYS[0], 7, 1 << 20, offset=12, dtype=torch.float64),
                            atol=1e-5, rtol=1e-5, what="GPU noise")


def test_no_allocation_proportional_to_size():
    p = torch.randn(1 << 24, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    zo_kernels.noise_axpy_([p], KEYS[:4], ALPHAS[:4], backend="triton")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 1 << 16


def test_rademacher_compiled_same_bits_as_cpu_kernel():
    """The compiled ±1 kernels (no FMA contraction: helpers.fp_fusion) give the bits every backend must
    give (docs/spec.md §9), here the CPU kernel's (held to the reference in test_backend_conformance.py)."""
    for i, (a, b) in enumerate(zip(rademacher_workload("triton", "cuda"), rademacher_workload("cpu"))):
        assert torch.equal(a, b), f"result {i}: Triton and the CPU kernel differ"
