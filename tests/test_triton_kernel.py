"""The Triton kernel (under the interpreter on CPU, compiled on CUDA) against the reference."""
import pytest
import torch

import zo_kernels
from zo_kernels import noise as N

from helpers import assert_verbose_allclose, exact_axpy, ulp, z_bound

pytestmark = pytest.mark.skipif("triton" not in zo_kernels.available_backends(),
                                reason=f"triton backend unavailable: {zo_kernels.backend_status().get('triton')}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 4, 5, 1023, 4097, (3, 5, 7)]
KEYS = [N.step_key(11, s) for s in range(4)]
ALPHAS = [1e-3, -2e-3, 0.5, -0.75]


def _make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)


def _run(backend, params, **kw):
    params = [p.clone() for p in params]
    zo_kernels.noise_axpy_(params, backend=backend, **kw)
    assert zo_kernels.last_backend() == backend
    return params


def _check_against_reference(params, **kw):
    """Fused vs reference: fp32 error vs float64 within 2x the reference's plus the spec's z bound;
    half precision within one ulp of the reference (the fp32 sums may straddle a rounding tie)."""
    fused = _run("triton", params, **kw)
    ref = _run("reference", params, **kw)
    exact = exact_axpy([p.cpu() for p in params], kw["keys"], kw["alphas"], kw.get("gamma", 1.0),
                       None if kw.get("dense") is None else [d.cpu() for d in kw["dense"]], kw.get("beta", 0.0),
                       kw.get("tensor_ids"), kw.get("offsets"))
    for i, (f, r, e) in enumerate(zip(fused, ref, exact)):
        f, r, e = f.cpu().double().reshape(-1), r.cpu().double().reshape(-1), e.reshape(-1)
        tid = i if kw.get("tensor_ids") is None else kw["tensor_ids"][i]
        off = 0 if kw.get("offsets") is None else kw["offsets"][i]
        if params[i].dtype == torch.float32:
            bound = z_bound(kw["keys"], kw["alphas"], tid, f.numel(), off)
            ref_err = (r - e).abs().max().item()
            assert (f - e).abs().max().item() <= 2 * ref_err + bound.max().item() + 1e-12, f"tensor {i}"
        else:
            assert ((f - r).abs() <= ulp(r, params[i].dtype) * 1.01).all(), f"tensor {i}: more than 1 ulp off"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_single_tensor_all_sizes(size, dtype):
    p = _make(size, dtype, 0)
    _check_against_reference([p], keys=KEYS[:1], alphas=ALPHAS[:1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_k_keys_gamma_and_dense(k, dtype):
    p = _make(1023, dtype, 1)
    d = _make(1023, torch.float32, 2)
    _check_against_reference([p], keys=KEYS[:k], alphas=ALPHAS[:k], gamma=0.97, dense=[d], beta=-0.3)


def test_mixed_list_in_one_call_with_ids_and_offsets():
    params = [_make(s, torch.float32, i) for i, s in enumerate([5, 4097, 1, (3, 5, 7), 1023, 4])]
    ids = [7, 0, 3, 9, 12, 2**32 - 1]
    offs = [0, 8, 12, 2**33, 3, 1]
    _check_against_reference(params, keys=KEYS[:2], alphas=ALPHAS[:2], gamma=1.01, tensor_ids=ids, offsets=offs)


def test_mixed_dtypes_in_one_call():
    params = [_make(100, dt, i) for i, dt in enumerate(DTYPES)]
    _check_against_reference(params, keys=KEYS[:1], alphas=[0.1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_matches_reference(dtype):
    out = torch.empty(4097, dtype=dtype, device=DEVICE)
    zo_kernels.noise_(out, KEYS[0], 3, offset=6, backend="triton")
    want = N.normal(KEYS[0], 3, 4097, offset=6, dtype=torch.float64)
    if dtype == torch.float32:
        assert_verbose_allclose(out.cpu(), want, atol=1e-5, rtol=1e-5, what="noise_ fp32")
    else:
        assert ((out.cpu().double() - want).abs() <= ulp(want, dtype) * 0.5 + 1e-5 * want.abs().clamp_min(1)).all()


def test_noise_stream_two_differs_from_stream_zero():
    a = torch.empty(64, device=DEVICE)
    b = torch.empty(64, device=DEVICE)
    zo_kernels.noise_(a, KEYS[0], 0, backend="triton")
    zo_kernels.noise_(b, KEYS[0], 0, stream=2, backend="triton")
    assert_verbose_allclose(b.cpu(), N.normal(KEYS[0], 0, 64, stream=2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("block", [2, 16, 256])
def test_independent_of_block_size(block):
    from zo_kernels.triton import noise_axpy as tk

    base = _make(1027, torch.float32, 3)
    outs = []
    for blk in (block, 1024):
        p = base.clone()
        tk.noise_axpy([p], [N.to_signed64(KEYS[1])], [0.25], 1.0, None, 0.0, "nearest", [4], [0], 0, block=blk)
        outs.append(p)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("split", [1, 4, 5, 517])
def test_split_tensor_equals_whole(split):
    """Applying the op to two slices at their offsets equals applying it to the whole tensor."""
    whole = _make(1031, torch.float32, 4)
    a = whole.clone()
    zo_kernels.noise_axpy_([a], KEYS[:2], ALPHAS[:2], tensor_ids=[6], backend="triton")
    b = whole.clone()
    lo, hi = b[:split], b[split:]
    zo_kernels.noise_axpy_([lo, hi], KEYS[:2], ALPHAS[:2], tensor_ids=[6, 6], offsets=[0, split], backend="triton")
    assert torch.equal(a, b)


def test_unaligned_storage_offset_view():
    """A contiguous view whose data pointer is not 16-byte aligned takes the unaligned path correctly."""
    buf = _make(1030, torch.float32, 5)
    view = buf[1:1026]
    assert view.data_ptr() % 16 != 0
    _check_against_reference([view], keys=KEYS[:1], alphas=[0.5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearest_rounding_is_fp32_result_rounded(dtype):
    p = _make(4097, dtype, 6)
    d = _make(4097, torch.float32, 7)
    kw = dict(keys=KEYS[:2], alphas=ALPHAS[:2], gamma=0.9, dense=[d], beta=0.1, backend="triton")
    half, full = p.clone(), p.float()
    zo_kernels.noise_axpy_([half], **kw)
    zo_kernels.noise_axpy_([full], **kw)
    assert torch.equal(half, full.to(dtype))
