"""Low-rank noise (zo_kernels.lowrank): the reference against the spec vectors and float64, the op's
semantics (multi-key, shards, 1-D tensors, exact restore), its input checks, its statistics, and every
backend against the reference."""
import math
import textwrap

import pytest
import torch

import zo_kernels
from zo_kernels import lowrank as L
from zo_kernels import noise as N
from zo_kernels import restore as R

from backends_helpers import skip_unless, targets
from helpers import spec_vectors
from native_helpers import assert_no_temporaries, ordered

VEC = spec_vectors()
KU = [N.step_key(5, s) for s in range(3)]
KV = N.step_key(5, 100)
HALF = [torch.bfloat16, torch.float16]
LOWRANK = targets("lowrank")


def _w(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _z64(key_u, key_v, tid, shape, rank, row0=0):
    """Z = U Vᵀ in float64, written out element by element from the spec's definitions."""
    m, n = shape[0], L.cols_of(shape)
    u = torch.tensor([[N.normal(key_u, tid, 1, offset=(row0 + i) * rank + k, stream=3, dtype=torch.float64).item()
                       for k in range(rank)] for i in range(m)], dtype=torch.float64)
    v = torch.tensor([[N.normal(key_v, tid, 1, offset=j * rank + k, stream=4, dtype=torch.float64).item()
                       for k in range(rank)] for j in range(n)], dtype=torch.float64)
    return (u @ v.T).view(shape)


# --------------------------------------------------------------------------- the noise itself
@pytest.mark.parametrize("case", VEC["lowrank"], ids=lambda c: f"t{c['tensor_id']}r{c['rank']}i{c['i']}")
def test_spec_vectors(case):
    r, tid = case["rank"], case["tensor_id"]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        u = L.lowrank_u(case["key_u"], tid, 1, r, row0=case["i"], dtype=dtype)[0].double()
        v = L.lowrank_v(case["key_v"], tid, case["j"] + 1, r, dtype=dtype)[case["j"]].double()
        want_u, want_v = torch.tensor(case["u"], dtype=torch.float64), torch.tensor(case["v"], dtype=torch.float64)
        assert (u - want_u).abs().max() <= tol * want_u.abs().clamp_min(1).max()
        assert (v - want_v).abs().max() <= tol * want_v.abs().clamp_min(1).max()
    z = L.lowrank_noise(case["key_u"], case["key_v"], tid, (case["i"] + 1, case["j"] + 1), r)
    assert abs(z[case["i"], case["j"]].item() - case["z"]) <= 1e-12 * max(1.0, abs(case["z"]))


def test_materialised_noise_matches_elementwise_transcription():
    z = L.lowrank_noise(KU[0], KV, 4, (6, 2, 3), 3, row0=5)
    assert torch.allclose(z, _z64(KU[0], KV, 4, (6, 2, 3), 3, row0=5), rtol=0, atol=1e-12)


def test_vectors_get_ordinary_full_rank_noise():
    z = L.lowrank_noise(KU[0], KV, 2, (9,), 4)
    assert torch.equal(z, N.normal(KU[0], 2, 9, dtype=torch.float64))


# ------------------------------------------------------------------------------ the op (reference)
@pytest.mark.parametrize("rank", [1, 2, 5])
def test_reference_op_matches_float64(rank):
    ps = [_w((7, 5), seed=1), _w((11,), seed=2), _w((3, 2, 4), seed=3)]
    theta = [p.double() for p in ps]
    alphas, gamma = [0.3, -0.7], 0.97
    zo_kernels.lowrank_noise_axpy_(ps, KU[:2], KV, alphas, rank=rank, gamma=gamma, backend="reference")
    for i, (p, t) in enumerate(zip(ps, theta)):
        want = t * gamma
        for k, a in zip(KU[:2], alphas):
            want = want + a * L.lowrank_noise(k, KV, i, t.shape, rank)
        assert (p.double() - want).abs().max() <= 1e-5 * want.abs().clamp_min(1).max()
    # float64 parameters: the oracle computes in float64
    p64 = [t.clone() for t in theta]
    zo_kernels.lowrank_noise_axpy_(p64, KU[:2], KV, alphas, rank=rank, gamma=gamma)
    assert zo_kernels.last_backend() == "reference"
    for i, t in enumerate(theta):
        want = t * gamma + sum(a * L.lowrank_noise(k, KV, i, t.shape, rank) for k, a in zip(KU[:2], alphas))
        assert (p64[i] - want).abs().max() <= 1e-12


def test_vector_tensors_take_the_full_rank_path_bit_for_bit():
    p, q = _w(13, seed=4), _w(13, seed=4)
    zo_kernels.lowrank_noise_axpy_([_w((2, 2)), p], KU[:2], KV, [0.5, 0.25], rank=2, gamma=0.9, backend="reference")
    zo_kernels.noise_axpy_([q], KU[:2], [0.5, 0.25], gamma=0.9, tensor_ids=[1], backend="reference")
    assert torch.equal(p, q)


def test_dense_u_space_term_is_beta_m_vt():
    p = _w((6, 5), seed=5)
    t = p.double()
    d = _w((6, 3), seed=6)
    zo_kernels.lowrank_noise_axpy_([p], [KU[0]], KV, [0.5], rank=3, dense=[d], beta=-2.0, backend="reference")
    v = L.lowrank_v(KV, 0, 5, 3, dtype=torch.float64)
    want = t + 0.5 * L.lowrank_noise(KU[0], KV, 0, (6, 5), 3) - 2.0 * (d.double() @ v.T)
    assert (p.double() - want).abs().max() <= 1e-5


@pytest.mark.parametrize("backend,device", LOWRANK)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dim0_shards_equal_the_whole(backend, device, dtype):
    whole = _w((9, 6), dtype, seed=7).to(device)
    shards = [whole[:4].clone(), whole[4:5].clone(), whole[5:].clone()]
    kw = dict(rank=3, gamma=0.99, rounding="stochastic", rounding_key=77, backend=backend)
    zo_kernels.lowrank_noise_axpy_([whole], KU[:2], KV, [0.1, -0.2], tensor_ids=[3], **kw)
    zo_kernels.lowrank_noise_axpy_(shards, KU[:2], KV, [0.1, -0.2], tensor_ids=[3] * 3, offsets=[0, 24, 30], **kw)
    assert torch.equal(torch.cat(shards), whole)


# ------------------------------------------------------------------------------------ bad input
def _bad_cases():
    m = lambda d: [_w((4, 3)).to(d), _w(5).to(d)]  # noqa: E731
    return [
        ("rank 0", m, dict(rank=0), ValueError, "rank=0"),
        ("rank 65", m, dict(rank=65), ValueError, "rank=65"),
        ("rank float", m, dict(rank=2.0), TypeError, "rank must be an int"),
        ("keys/alphas", m, dict(rank=2, alphas=[1.0, 2.0]), ValueError, r"len\(keys_u\)=1 but len\(alphas\)=2"),
        ("key_v range", m, dict(rank=2, key_v=2**64), ValueError, "key_v"),
        ("nan alpha", m, dict(rank=2, alphas=[math.nan]), ValueError, r"alphas\[0\] is nan"),
        ("shard offset", m, dict(rank=2, offsets=[4, 0]), ValueError, r"offsets\[0\]=4 is not a multiple of the row length 3"),
        ("dense shape", m, dict(rank=2, dense=[torch.zeros(4, 3), torch.zeros(5)]), ValueError, r"dense\[0\] must be a float32 \(4, 2\)"),
        ("dense count", m, dict(rank=2, dense=[torch.zeros(4, 2)]), ValueError, "dense has 1 tensors for 2"),
        ("exact + vector dense", m, dict(rank=2, dense=[torch.zeros(4, 2), torch.zeros(5)], undo=[0.0]), ValueError,
         "exact-restore form"),
        ("undo count", m, dict(rank=2, undo=[1.0, 2.0]), ValueError, "undo has 2 coefficients for 1 keys"),
        ("non-contiguous", lambda d: [_w((4, 3)).to(d).t()], dict(rank=2), ValueError, "not contiguous"),
        ("aliased", None, dict(rank=2), ValueError, "share memory"),
        ("rounding", m, dict(rank=2, rounding="up"), ValueError, "rounding"),
    ]


@pytest.mark.parametrize("name,make,kw,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
@pytest.mark.parametrize("backend,device", LOWRANK)
def test_bad_input_raises_before_writing(name, make, kw, exc, match, backend, device):
    if make is None:
        t = _w((4, 3)).to(device)
        params = [t, t]
    else:
        params = make(device)
    before = [p.clone() for p in params]
    kw = {k: [t.to(device) for t in v] if k == "dense" else v for k, v in kw.items()}
    args = (params, [KU[0]], kw.pop("key_v", KV), kw.pop("alphas", [1.0]))
    with pytest.raises(exc, match=match):
        zo_kernels.lowrank_noise_axpy_(*args, backend=backend, **kw)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


# ----------------------------------------------------------------------------- exact restore
@pytest.mark.parametrize("backend,device", LOWRANK)
@pytest.mark.parametrize("dtype", HALF)
def test_exact_restore_returns_to_theta(backend, device, dtype):
    """+μUVᵀ (θ0's residues written to the plane), −μ (undo +μ, plane read), then undo −μ (plane read):
    θ0 bit for bit (an 8-bit plane resolves every ambiguity at these magnitudes)."""
    theta = [_w((33, 17), dtype, seed=8, scale=0.02).to(device), _w((10,), dtype, seed=9, scale=0.02).to(device)]
    ps = [t.clone() for t in theta]
    mu, kw = 1e-3, dict(rank=4, backend=backend)
    planes = R.make_planes(ps, 8)
    zo_kernels.lowrank_noise_axpy_(ps, [KU[0]], KV, [mu], undo=[0.0], planes=planes, **kw)
    assert not all(torch.equal(p, t) for p, t in zip(ps, theta))
    zo_kernels.lowrank_noise_axpy_(ps, [KU[0]], KV, [-mu], undo=[mu], planes=planes, **kw)
    zo_kernels.lowrank_noise_axpy_(ps, [KU[0]], KV, [0.0], undo=[-mu], planes=planes, **kw)
    for p, t in zip(ps, theta):
        assert torch.equal(ordered(p), ordered(t))
    # the fused path drifts: it is not an identity
    naive = [t.clone() for t in theta]
    for a in (mu, -2 * mu, mu):
        zo_kernels.lowrank_noise_axpy_(naive, [KU[0]], KV, [a], **kw)
    assert any(not torch.equal(p, t) for p, t in zip(naive, theta))


# ------------------------------------------------------------------------------- statistics
def test_statistics_mean_variance_independence():
    r, m, n = 4, 256, 192
    z1 = L.lowrank_noise(KU[0], KV, 0, (m, n), r).reshape(-1)
    assert abs(z1.mean().item()) < 0.05                       # E[Z] = 0; sd of the mean ≈ 2/√(m·n)·√(m+n)
    assert abs(z1.var().item() / r - 1) < 0.1                  # Var[Z_ij] = r (no 1/√r factor)
    kurt = ((z1 - z1.mean()) ** 4).mean() / z1.var() ** 2      # a sum of r products of normals: 3 + 6/r
    assert abs(kurt.item() - (3 + 6 / r)) < 0.6
    others = [L.lowrank_noise(KU[1], KV, 0, (m, n), r),          # next step (same V)
              L.lowrank_noise(KU[0], KV, 1, (m, n), r),          # another tensor
              L.lowrank_noise(KU[0], N.step_key(5, 101), 0, (m, n), r)]  # another period
    for z2 in others:
        c = torch.corrcoef(torch.stack([z1, z2.reshape(-1)]))[0, 1].item()
        assert abs(c) < 0.03, c
    # U and V streams are not the noise stream: U V^T is not built from z itself
    u = L.lowrank_u(KU[0], 0, m, r, dtype=torch.float64).reshape(-1)
    assert abs(torch.corrcoef(torch.stack([u, N.normal(KU[0], 0, m * r, dtype=torch.float64)]))[0, 1]) < 0.05


# ------------------------------------------------------------------------------ backends
# Every backend (CUDA ones on a GPU) against the reference: tests/test_backend_conformance.py.


_RSS_SCRIPT = textwrap.dedent("""
    import torch, zo_kernels
    m, n = 8192, 4096
    p = torch.empty(m, n).fill_(0.5)        # 128 MiB, every page touched
    zo_kernels.lowrank_noise_axpy_([torch.zeros(8, 8)], [1], 2, [1.0], rank=8, backend="cpu")  # warm up
    base = hwm()
    zo_kernels.lowrank_noise_axpy_([p], [11, 12], 13, [1e-3, -1e-3], rank=8, gamma=0.999, backend="cpu")
    print(hwm() - base, m * n * 4)
""")


@skip_unless("cpu", "cpu", "lowrank")
def test_cpu_allocates_nothing_of_theta_size():
    assert_no_temporaries(_RSS_SCRIPT)
