"""Stochastic rounding of the fused result to bf16/fp16 on every backend (tests/backends_helpers.py):
unbiased, and the reference's choices; fp32 left to nearest: test_backend_conformance.py."""
import math

import pytest
import torch

import zo_kernels
from zo_kernels import noise as N

from backends_helpers import targets

HALF = [torch.bfloat16, torch.float16]


def _bump(dtype, base, frac, n, backend, device, rounding_key=12345):
    """n copies of `base` (exact in dtype, not a power of two) plus frac·ulp, through the dense term."""
    ulp = math.ldexp(1.0, math.frexp(abs(base))[1] - 1 - {torch.bfloat16: 7, torch.float16: 10}[dtype])
    if dtype == torch.float16 and abs(base) < 2.0**-14:
        ulp = 2.0**-24
    p = torch.full((n,), base, dtype=dtype, device=device)
    d = torch.full((n,), frac * ulp, dtype=torch.float32, device=device)
    zo_kernels.noise_axpy_([p], [], [], dense=[d], beta=1.0, rounding="stochastic",
                           rounding_key=rounding_key, backend=backend)
    return p.double(), ulp


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("base,frac", [(1.0, 0.3), (-1.5, 0.05), (3.0, 0.5), (0.0078125, 0.9), (-1.25 * 2.0**-20, 0.37)])
def test_stochastic_rounding_is_unbiased(backend, device, dtype, base, frac):
    n = 65536
    out, ulp = _bump(dtype, base, frac, n, backend, device)
    # Every element lands on one of the two neighbours of base + frac·ulp.
    lo, hi = base, base + ulp
    assert bool(((out == lo) | (out == hi)).all())
    p_up = (out == hi).double().mean().item()
    assert abs(p_up - frac) < 6 * math.sqrt(frac * (1 - frac) / n)


@pytest.mark.parametrize("backend,device", targets(reference=False))
def test_stochastic_rounding_matches_reference_bits(backend, device):
    """Same key, same words: every backend makes the same up/down choices as the reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4099, generator=g).to(torch.bfloat16).to(device)
    d = (torch.randn(4099, generator=g) * 1e-3).to(device)
    a, b = x.clone(), x.clone()
    kw = dict(keys=[N.step_key(1, 1)], alphas=[1e-3], dense=[d], beta=1.0, rounding="stochastic", tensor_ids=[5])
    zo_kernels.noise_axpy_([a], backend=backend, **kw)
    zo_kernels.noise_axpy_([b], backend="reference", **kw)
    # Only elements whose fp32 sums differ by round-off can choose differently.
    assert (a != b).double().mean().item() < 1e-3


@pytest.mark.parametrize("dtype", HALF)
def test_reference_stochastic_round_of_representable_values_is_identity(dtype):
    x = torch.randn(10000).to(dtype)
    words = N.random_words(99, 0, 10000)
    assert torch.equal(N.stochastic_round(x.float(), dtype, words), x)


def test_default_rounding_key_differs_between_calls():
    k1 = zo_kernels.ops.default_rounding_key([1], [0.5], 1.0, 0.0)
    k2 = zo_kernels.ops.default_rounding_key([1], [-1.0], 1.0, 0.0)
    assert k1 != k2
