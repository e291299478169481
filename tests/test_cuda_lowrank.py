"""The low-rank pass on the CUDA C++ kernel (csrc/cuda/lowrank_kernel.cu) on a GPU: bit-identity with the CPU
kernel (same factors, same IEEE operations in the same order; the exact form's planes too), mixed dtypes
in one call, unaligned views, bad input, streams.  Against the reference: tests/test_backend_conformance.py;
shards and exact restore on the GPU: tests/test_lowrank.py (every backend of tests/backends_helpers.py)."""
import pytest
import torch

import zo_kernels
from zo_kernels import noise as N
from zo_kernels import restore as R

from native_helpers import make_tensor

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KU = [N.step_key(8, s) for s in range(4)]
KV = N.step_key(8, 100)
SHAPES = [(5, 7), (37, 13), (3, 2, 4), (1, 3), (9,), (64, 33), (300, 257), (0, 4)]


@pytest.fixture(autouse=True)
def _needs_backend():
    if "cuda" not in zo_kernels.available_backends():
        pytest.fail(f"CUDA is present but the native cuda backend is not: {zo_kernels.backend_status().get('cuda')}")
    if zo_kernels.backends.get("cuda").lowrank is None:
        pytest.fail("the native cuda backend has no low-rank pass")


def _run(backend, params, planes=None, **kw):
    device = "cpu" if backend == "cpu" else "cuda"
    params = [p.clone().to(device) for p in params]
    if kw.get("dense") is not None:
        kw = dict(kw, dense=[d.to(device) for d in kw["dense"]])
    planes = [pl.clone().to(device) for pl in planes] if planes is not None else None
    zo_kernels.lowrank_noise_axpy_(params, backend=backend, planes=planes, **kw)
    torch.cuda.synchronize()
    assert zo_kernels.last_backend() == backend
    return [p.cpu() for p in params], [pl.cpu() for pl in planes] if planes is not None else None


def _check_equals_cpu(params, planes=None, **kw):
    (g, gp), (c, cp) = _run("cuda", params, planes, **kw), _run("cpu", params, planes, **kw)
    for i, (a, b) in enumerate(zip(g, c)):
        assert torch.equal(a, b), f"tensor {i}: CUDA and CPU kernels differ"
    for i, (a, b) in enumerate(zip(gp or [], cp or [])):
        assert torch.equal(a, b), f"plane {i}: CUDA and CPU kernels differ"


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank,k", [(1, 1), (3, 2), (16, 4), (64, 1)])
def test_bit_identical_to_cpu_kernel(rank, k, dtype, rounding):
    params = [make_tensor(s, dtype, i) for i, s in enumerate(SHAPES)]
    _check_equals_cpu(params, keys_u=KU[:k], key_v=KV, alphas=[0.5, -0.25, 1e-3, 2.0][:k], rank=rank, gamma=0.99,
                      rounding=rounding, rounding_key=N.step_key(1, 2))


def test_dense_term_ids_offsets_mixed_dtypes():
    params = [make_tensor(s, DTYPES[i % 3], i) for i, s in enumerate(SHAPES)]
    dense = [make_tensor((s[0], 4), torch.float32, 50 + i) if len(s) >= 2 else torch.zeros(s)
             for i, s in enumerate(SHAPES)]
    # dim-0 shards: offsets are multiples of the row length (for the vector, any index)
    offsets = [7 * 3, 13 * 101, 8 * (2**33 + 1), 3 * 5, 4 * (2**32 - 40) + 3, 33, 257 * 9, 0]
    _check_equals_cpu(params, keys_u=KU[:3], key_v=KV, alphas=[1e-3, -2e-3, 0.5], rank=4, gamma=0.98, dense=dense,
                      beta=-0.3, tensor_ids=[9, 0, 2**32 - 1, 5, 77, 3, 12, 1], offsets=offsets)


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_form_bit_identical_to_cpu_kernel(dtype, bits):
    """Residues written (undo all zero), then read while inverting: theta and planes equal the CPU kernel's."""
    params = [(make_tensor(s, torch.float32, i) * 0.02).to(dtype) for i, s in enumerate(SHAPES)]
    planes = R.make_planes(params, bits)
    kw = dict(key_v=KV, rank=4)
    _check_equals_cpu(params, planes, keys_u=[KU[0]], alphas=[1e-3], undo=[0.0], **kw)
    mid, mid_planes = _run("cpu", params, planes, keys_u=[KU[0]], alphas=[1e-3], undo=[0.0], **kw)
    _check_equals_cpu(mid, mid_planes, keys_u=KU[:2], alphas=[-1e-3, 2e-3], undo=[1e-3, 0.0], gamma=0.999, **kw)


def test_unaligned_view_takes_the_scalar_path():
    """A view starting one row in (odd row length): the pointer is off the vector boundary; same numbers."""
    for dtype in DTYPES:
        base = make_tensor((41, 7), dtype, 3).cuda()
        view = base[1:]
        ref = view.clone()
        kw = dict(rank=2, gamma=0.9, tensor_ids=[1], offsets=[7], backend="cuda")
        zo_kernels.lowrank_noise_axpy_([view], KU[:2], KV, [0.5, -0.5], **kw)
        zo_kernels.lowrank_noise_axpy_([ref], KU[:2], KV, [0.5, -0.5], **kw)
        assert torch.equal(view, ref), dtype


def test_bad_input_raises_before_writing():
    p = make_tensor((4, 3), torch.float32, 0).cuda()
    keep = p.clone()
    with pytest.raises(ValueError, match="row length"):
        zo_kernels.lowrank_noise_axpy_([p], [KU[0]], KV, [1.0], rank=2, offsets=[4], backend="cuda")
    with pytest.raises(ValueError, match="dense"):
        zo_kernels.lowrank_noise_axpy_([p], [KU[0]], KV, [1.0], rank=2, dense=[torch.zeros(4, 3, device="cuda")],
                                       backend="cuda")
    with pytest.raises(RuntimeError, match="rank"):
        torch.ops.zo_kernels._lowrank_axpy_native([p], [1], 2, [1.0], [], 1.0, [], 0.0, [], 2, 65, 0, [0], [0], 0)
    assert torch.equal(p, keep)


def test_runs_on_the_current_stream():
    p = make_tensor((512, 300), torch.float32, 0).cuda()
    expect = p.clone()
    zo_kernels.lowrank_noise_axpy_([expect], KU[:1], KV, [0.1], rank=8, backend="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        zo_kernels.lowrank_noise_axpy_([p], KU[:1], KV, [0.1], rank=8, backend="cuda")
    s.synchronize()
    assert torch.equal(p, expect)
