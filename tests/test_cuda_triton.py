"""On a CUDA GPU: the compiled Triton kernel against the reference, and against the other GPU backends."""
import pytest
import torch

import zo_kernels
from zo_kernels import noise as N

from helpers import assert_verbose_allclose, exact_axpy, ulp, z_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KEYS = [N.step_key(3, s) for s in range(4)]
ALPHAS = [1e-3, -2e-3, 0.5, -0.75]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [1, 3, 4, 5, 1023, 4097, 1 << 20, (3, 5, 7)])
@pytest.mark.parametrize("k", [1, 4])
def test_triton_vs_reference_on_gpu(dtype, size, k):
    shape = (size,) if isinstance(size, int) else size
    p = torch.randn(shape, device="cuda").to(dtype)
    d = torch.randn(shape, device="cuda")
    kw = dict(keys=KEYS[:k], alphas=ALPHAS[:k], gamma=0.99, dense=[d], beta=0.2)
    a, b = p.clone(), p.clone()
    zo_kernels.noise_axpy_([a], backend="triton", **kw)
    zo_kernels.noise_axpy_([b], backend="reference", **kw)
    a, b = a.double().cpu().reshape(-1), b.double().cpu().reshape(-1)
    if dtype == torch.float32:
        e = exact_axpy([p.cpu()], kw["keys"], kw["alphas"], 0.99, [d.cpu()], 0.2)[0].reshape(-1)
        bound = z_bound(kw["keys"], kw["alphas"], 0, a.numel()).max().item()
        assert (a - e).abs().max().item() <= 2 * (b - e).abs().max().item() + bound
    else:
        assert ((a - b).abs() <= ulp(b, dtype) * 1.01).all()


def test_noise_on_gpu_within_spec_bound():
    out = torch.empty(1 << 20, device="cuda")
    zo_kernels.noise_(out, KEYS[0], 7, offset=12)
    assert zo_kernels.last_backend() == "triton"
    assert_verbose_allclose(out.cpu(), N.normal(KEYS[0], 7, 1 << 20, offset=12, dtype=torch.float64),
                            atol=1e-5, rtol=1e-5, what="GPU noise")


def test_many_tensors_one_call_on_gpu():
    params = [torch.randn(s, device="cuda") for s in (1, 7, 4096, 333, 65537)]
    ref = [p.clone() for p in params]
    zo_kernels.noise_axpy_(params, KEYS[:2], ALPHAS[:2], backend="triton")
    zo_kernels.noise_axpy_(ref, KEYS[:2], ALPHAS[:2], backend="reference")
    for i, (a, b) in enumerate(zip(params, ref)):
        bound = z_bound(KEYS[:2], ALPHAS[:2], i, a.numel()).max().item()
        assert (a - b).abs().max().item() <= bound + 1e-6


def test_no_allocation_proportional_to_size():
    p = torch.randn(1 << 24, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    zo_kernels.noise_axpy_([p], KEYS[:4], ALPHAS[:4], backend="triton")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 1 << 16
