"""What is specific to the CUDA C++ kernel (backend "cuda", zo_kernels._C built with CUDA) on a GPU:
bit-identity with the CPU kernel, its internal ops, alignment and streams.  The backend contract it
shares with the others (against the reference) is tests/test_backend_conformance.py.

Both native kernels evaluate csrc/philox.h with the same IEEE operations in the same order (the CUDA
build uses __fmul_rn / __fadd_rn, the CPU build -ffp-contract=off), so CUDA and CPU results are
expected to be bit-identical; against the reference the usual bounds apply.
"""
import pytest
import torch

import zo_kernels
from zo_kernels import noise as N

from backends_helpers import skip_unless
from helpers import z_bound
from native_helpers import make_tensor
from test_backend_conformance import CASES, MIXED

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 4, 5, 1023, 4097, (3, 5, 7), 1 << 20]
KEYS = [N.step_key(6, s) for s in range(4)]
ALPHAS = [1e-3, -2e-3, 0.5, -0.75]


@pytest.fixture(autouse=True)
def _needs_backend():
    if "cuda" not in zo_kernels.available_backends():
        pytest.fail(f"CUDA is present but the native cuda backend is not: {zo_kernels.backend_status().get('cuda')}")


def _run(backend, params, **kw):
    device = "cpu" if backend == "cpu" else "cuda"
    params = [p.clone().to(device) for p in params]
    if kw.get("dense") is not None:
        kw = dict(kw, dense=[d.to(device) for d in kw["dense"]])
    zo_kernels.noise_axpy_(params, backend=backend, **kw)
    torch.cuda.synchronize()
    assert zo_kernels.last_backend() == backend
    return [p.cpu() for p in params]


def _check_equals_cpu(params, **kw):
    """CUDA == CPU native bit for bit (against the reference: tests/test_backend_conformance.py)."""
    for i, (f, c) in enumerate(zip(_run("cuda", params, **kw), _run("cpu", params, **kw))):
        assert torch.equal(f, c), f"tensor {i}: CUDA and CPU kernels differ"


def test_words_bit_exact():
    for offset in (0, 1, 4 * (2**32 - 5) + 2, 2**61 + 3):
        for tid, stream, n in ((0, 0, 1), (3, 2, 5), (2**32 - 1, 2**32 - 1, 1023), (7, 0, 100_003)):
            out = torch.empty(n, dtype=torch.int32, device="cuda")
            torch.ops.zo_kernels._noise_native(out, N.to_signed64(KEYS[1]), tid, offset, stream, 0)
            got = out.cpu().to(torch.int64) & N.M32
            assert torch.equal(got, N.random_words(KEYS[1], tid, n, offset=offset, stream=stream)), (offset, tid)


def test_noise_equals_cpu_kernel():
    n = 1 << 20
    for dtype in DTYPES:
        g = zo_kernels.noise_(torch.empty(n, dtype=dtype, device="cuda"), KEYS[2], 3, 5, backend="cuda")
        c = zo_kernels.noise_(torch.empty(n, dtype=dtype), KEYS[2], 3, 5, backend="cpu")
        assert torch.equal(g.cpu(), c), dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES + MIXED, ids=[c.name for c in CASES + MIXED])
def test_bit_identical_to_cpu_kernel(case, dtype):
    params, kw = case.build(dtype, "cpu")
    _check_equals_cpu(params, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_list_of_sizes_keys_gamma(dtype, k):
    params = [make_tensor(s, dtype, i) for i, s in enumerate(SIZES)]
    _check_equals_cpu(params, keys=KEYS[:k], alphas=ALPHAS[:k], gamma=0.999)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_mixed_dtypes_offsets_ids(dtype):
    params = [make_tensor(s, dtype, i) for i, s in enumerate(SIZES)]
    dense = [make_tensor(s, DTYPES[i % 3], 50 + i) for i, s in enumerate(SIZES)]
    _check_equals_cpu(params, keys=KEYS[:2], alphas=ALPHAS[:2], gamma=0.98, dense=dense, beta=-0.03,
                      tensor_ids=[9, 0, 2**32 - 1, 5, 77, 3, 12, 1],
                      offsets=[0, 1, 2, 3, 2**33 + 1, 4 * (2**32 - 40) + 3, 6, 4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_matches_cpu(dtype):
    params = [make_tensor(s, dtype, i) for i, s in enumerate(SIZES)]
    _check_equals_cpu(params, keys=KEYS[:2], alphas=[1e-4, -3e-4], rounding="stochastic",
                      rounding_key=N.step_key(1, 2))


def test_unaligned_pointers():
    """Views starting one element in take the scalar path; the numbers do not change."""
    for dtype in DTYPES:
        base = make_tensor(4101, dtype, 7).cuda()
        view = base[1:]  # data pointer off the 16/8-byte boundary
        ref = view.clone()
        zo_kernels.noise_axpy_([view], KEYS[:2], ALPHAS[:2], gamma=0.9, backend="cuda")
        zo_kernels.noise_axpy_([ref], KEYS[:2], ALPHAS[:2], gamma=0.9, backend="cuda")
        assert torch.equal(view, ref), dtype


def test_runs_on_the_current_stream():
    p = make_tensor(1 << 20, torch.float32, 0).cuda()
    expect = p.clone()
    zo_kernels.noise_axpy_([expect], KEYS[:1], [0.1], backend="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        zo_kernels.noise_axpy_([p], KEYS[:1], [0.1], backend="cuda")
    s.synchronize()
    assert torch.equal(p, expect)


@skip_unless("triton", "cuda")
def test_second_opinion_against_triton():
    params = [make_tensor(s, torch.float32, i) for i, s in enumerate(SIZES)]
    kw = dict(keys=KEYS[:2], alphas=ALPHAS[:2], gamma=0.999)
    for i, (a, b) in enumerate(zip(_run("cuda", params, **kw), _run("triton", params, **kw))):
        bound = z_bound(kw["keys"], kw["alphas"], i, a.numel())
        assert ((a.double() - b.double()).abs().reshape(-1) <= 2 * bound + 1e-6 * a.double().abs().reshape(-1)).all()
