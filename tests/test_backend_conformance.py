"""The backend contract (docs/spec.md), once, for every backend: noise_axpy_, noise_, the exact-restore
form (undo= / planes=), lowrank_noise_axpy_ and noise_adam_.

Each backend is checked against the PyTorch reference and a float64 evaluation of the same call.
The backends come from tests/backends_helpers.py (one list: CUDA backends join when a GPU is present,
what cannot run here is skipped with its reason).  What is specific to one backend (instruction sets,
thread counts, PTX, alignment paths, allocation) stays in its own file.

To add an op or a case: add a row to CASES (a call of noise_axpy_), ADAM_CASES (a call of noise_adam_)
or OPCHECKS (opcheck runs once per OPCHECKS row and device, not per backend: see test_opcheck).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

import zo_kernels
from zo_kernels import backends
from zo_kernels import noise as N
from zo_kernels import restore as R
from zo_kernels.rounding import default_rounding_key

from adam_helpers import COEFFS as ADAM_COEFFS
from adam_helpers import KEYS as ADAM_KEYS
from adam_helpers import AdamCase, check_adam_case, check_three_steps, run_adam
from adam_helpers import inputs as adam_inputs
from backends_helpers import devices, targets
from helpers import assert_verbose_allclose, exact_axpy, spec_vectors, z_bound
from native_helpers import assert_close_to_reference, check_against_reference, make_tensor, ordered, run

# (backend, device) for every backend on every device (tests/backends_helpers.py: what cannot run here
# is skipped with its reason), the reference included; KERNELS without it (compared to it).
TARGETS = targets()
KERNELS = targets(reference=False)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF = [torch.bfloat16, torch.float16]
SIZES = [1, 3, 4, 5, 1023, 4097, (3, 5, 7)]
KEYS = [N.step_key(5, s) for s in range(4)]
ALPHAS = [1e-3, -2e-3, 0.5, -0.75]
# |z - z_float64| / max(1, |z|) on the spec vectors: the spec's bound, tighter where a backend claims it.
VECTOR_TOL = {"cpu": 1e-6, "cuda": 1e-6}


# ------------------------------------------------------------------------------ the case table
@dataclass(frozen=True)
class Case:
    """One noise_axpy_ call: tensors of `sizes` (dtype from the test, or cycling DTYPES when
    mixed_dtypes), `k` keys, and the scalar and index arguments."""

    name: str
    sizes: tuple
    k: int = 1
    gamma: float = 1.0
    dense: Optional[str] = None             # None, "fp32", or "mixed" (cycling DTYPES)
    beta: float = 0.0
    mixed_dtypes: bool = False
    tensor_ids: Optional[tuple] = None
    offsets: Optional[tuple] = None
    extra: dict = field(default_factory=dict)

    def build(self, dtype, device):
        params = [make_tensor(s, DTYPES[i % 3] if self.mixed_dtypes else dtype, i).to(device)
                  for i, s in enumerate(self.sizes)]
        kw = dict(keys=KEYS[:self.k], alphas=ALPHAS[:self.k], gamma=self.gamma, beta=self.beta, **self.extra)
        if self.dense is not None:
            kw["dense"] = [make_tensor(s, torch.float32 if self.dense == "fp32" else DTYPES[i % 3], 100 + i)
                           .to(device) for i, s in enumerate(self.sizes)]
        if self.tensor_ids is not None:
            kw["tensor_ids"] = list(self.tensor_ids)
        if self.offsets is not None:
            kw["offsets"] = list(self.offsets)
        return params, kw


IDS = (9, 0, 2**32 - 1, 5, 77, 3, 12)
OFFSETS = (0, 1, 2, 3, 2**33 + 1, 4 * (2**32 - 40) + 3, 6)
CASES = [Case(f"size{s}", (s,)) for s in SIZES] + [
    *[Case(f"{k}keys-gamma", tuple(SIZES), k=k, gamma=0.999) for k in (1, 2, 3, 4)],
    *[Case(f"{k}keys-dense", (1023,), k=k, gamma=0.97, dense="fp32", beta=-0.3) for k in (1, 2, 3, 4)],
    Case("dense-mixed-dtypes", tuple(SIZES), k=2, gamma=0.98, dense="mixed", beta=-0.03),
    Case("ids-offsets", tuple(SIZES), k=2, tensor_ids=IDS, offsets=OFFSETS),
    Case("stochastic", tuple(SIZES), k=2, extra=dict(rounding="stochastic", rounding_key=N.step_key(1, 2))),
]
MIXED = [Case("mixed-param-dtypes", tuple(SIZES), k=2, gamma=1.01, mixed_dtypes=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_matches_reference(backend, device, case, dtype):
    params, kw = case.build(dtype, device)
    check_against_reference(backend, params, **kw)


@pytest.mark.parametrize("case", MIXED, ids=[c.name for c in MIXED])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_mixed_param_dtypes_one_call(backend, device, case):
    params, kw = case.build(None, device)
    check_against_reference(backend, params, **kw)


GPU_KERNELS = targets(reference=False, device="cuda")


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("size", [1, 3, 4, 5, 1023, 4097, 1 << 20, (3, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", GPU_KERNELS)
def test_gpu_sizes_keys_dense(backend, device, dtype, size, k):
    """On a GPU (sizes are cheap there): one tensor, dense term, 1 or 4 keys, up to 2^20 elements."""
    p = make_tensor(size, dtype, 0).to(device)
    d = make_tensor(size, torch.float32, 1).to(device)
    check_against_reference(backend, [p], keys=KEYS[:k], alphas=ALPHAS[:k], gamma=0.99, dense=[d], beta=0.2)


@pytest.mark.parametrize("backend,device", GPU_KERNELS)
def test_gpu_many_tensors_one_call(backend, device):
    params = [torch.randn(s, device=device) for s in (1, 7, 4096, 333, 65537)]
    got = run(backend, params, keys=KEYS[:2], alphas=ALPHAS[:2])
    ref = run("reference", params, keys=KEYS[:2], alphas=ALPHAS[:2])
    for i, (a, b) in enumerate(zip(got, ref)):
        bound = z_bound(KEYS[:2], ALPHAS[:2], i, a.numel()).max().item()
        assert (a - b).abs().max().item() <= bound + 1e-6


# --------------------------------------------------------------------------- shards and slices
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", KERNELS)
def test_shards_equal_whole(backend, device, dtype):
    """A tensor updated whole equals its shards updated with offsets (any cut, not only at quads)."""
    whole = make_tensor(6001, dtype, 3).to(device)
    kw = dict(keys=KEYS[:3], alphas=ALPHAS[:3], gamma=0.9, tensor_ids=[4], rounding="stochastic", rounding_key=77)
    ref = whole.clone()
    zo_kernels.noise_axpy_([ref], backend=backend, **kw)
    cuts = [0, 1, 4, 5, 6, 7, 64, 517, 1001, 4096, 4097, 6001]
    shards = [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    zo_kernels.noise_axpy_(shards, backend=backend, **dict(kw, tensor_ids=[4] * len(shards), offsets=cuts[:-1]))
    assert torch.equal(torch.cat(shards), ref)


@pytest.mark.parametrize("split", [1, 4, 5, 517])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_two_slices_in_place_equal_whole(backend, device, split):
    """Two views of one tensor at their offsets, in one call, equal the whole tensor updated at once."""
    whole = make_tensor(1031, torch.float32, 4).to(device)
    a = whole.clone()
    zo_kernels.noise_axpy_([a], KEYS[:2], ALPHAS[:2], tensor_ids=[6], backend=backend)
    b = whole.clone()
    zo_kernels.noise_axpy_([b[:split], b[split:]], KEYS[:2], ALPHAS[:2], tensor_ids=[6, 6], offsets=[0, split],
                           backend=backend)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- special calls
@pytest.mark.parametrize("backend,device", KERNELS)
def test_no_keys_only_gamma_and_empty_tensors(backend, device):
    params = [make_tensor(100, torch.float32, 0).to(device), torch.empty(0, device=device),
              make_tensor(5, torch.bfloat16, 1).to(device)]
    out = run(backend, params, keys=[], alphas=[], gamma=0.5)
    assert torch.equal(out[0], params[0] * 0.5) and out[1].numel() == 0
    assert torch.equal(out[2], (params[2].float() * 0.5).bfloat16())


@pytest.mark.parametrize("backend,device", KERNELS)
def test_dense_may_be_the_param_itself(backend, device):
    p = make_tensor(1000, torch.float32, 0).to(device)
    expect = p.clone()
    zo_kernels.noise_axpy_([expect], [KEYS[0]], [0.1], gamma=0.5, dense=[p.clone()], beta=0.25, backend=backend)
    zo_kernels.noise_axpy_([p], [KEYS[0]], [0.1], gamma=0.5, dense=[p], beta=0.25, backend=backend)
    assert torch.equal(p, expect)


# ------------------------------------------------------------------------------------ rounding
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend,device", KERNELS)
def test_nearest_is_torch_rounding_of_the_float32_result(backend, device, dtype):
    params = [make_tensor(s, dtype, i).to(device) for i, s in enumerate(SIZES)]
    dense = [make_tensor(s, dtype, 50 + i).to(device) for i, s in enumerate(SIZES)]
    kw = dict(keys=KEYS[:3], alphas=ALPHAS[:3], gamma=0.97, beta=0.1)
    half = run(backend, params, dense=dense, **kw)
    full = run(backend, [p.float() for p in params], dense=[d.float() for d in dense], **kw)
    for h, f in zip(half, full):
        assert torch.equal(h, f.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend,device", KERNELS)
def test_stochastic_matches_reference_bits_without_noise(backend, device, dtype):
    """With the noise term zero the fp32 sums agree exactly, so the stream-2 rounding must too."""
    params = [make_tensor(s, dtype, i).to(device) for i, s in enumerate(SIZES)]
    dense = [make_tensor(s, torch.float32, 9 + i).to(device) * 1e-3 for i, s in enumerate(SIZES)]
    kw = dict(keys=[KEYS[0]], alphas=[0.0], gamma=1.0, dense=dense, beta=0.37, rounding="stochastic",
              rounding_key=N.step_key(3, 3), offsets=[0, 5, 2, 3, 1, 0, 2**35 + 1])
    for a, b in zip(run(backend, params, **kw), run("reference", params, **kw)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_stochastic_rounding_fp32_is_nearest(backend, device):
    p = [make_tensor(1000, torch.float32, 0).to(device)]
    kw = dict(keys=KEYS[:1], alphas=[0.1])
    assert torch.equal(run(backend, p, rounding="stochastic", **kw)[0], run(backend, p, **kw)[0])


# --------------------------------------------------------------------------------------- noise_
@pytest.mark.parametrize("backend,device", TARGETS)
def test_spec_z_vectors(backend, device):
    tol = VECTOR_TOL.get(backend, 1e-5)
    for v in spec_vectors()["z"]:
        out = torch.empty(1, device=device)
        zo_kernels.noise_(out, v["key"], v["tensor_id"], v["index"], stream=v["stream"], backend=backend)
        assert abs(out.item() - v["z"]) <= tol * max(1.0, abs(v["z"])), v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", KERNELS)
def test_noise_matches_float64_and_half_is_rounded_float32(backend, device, dtype):
    n, key, off = 4097, KEYS[0], 6
    z32 = zo_kernels.noise_(torch.empty(n, device=device), key, 3, off, backend=backend)
    assert_verbose_allclose(z32.cpu(), N.normal(key, 3, n, offset=off, dtype=torch.float64), atol=1e-5, rtol=1e-5,
                            what=f"noise_ {backend}")
    out = zo_kernels.noise_(torch.empty(n, dtype=dtype, device=device), key, 3, off, backend=backend)
    assert torch.equal(out, z32.to(dtype))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_noise_slice_at_offset_is_slice_of_noise(backend, device):
    n, key = 10_000, KEYS[3]
    full = zo_kernels.noise_(torch.empty(n, device=device), key, 2, backend=backend)
    for a, b in ((0, 1), (1, 2), (3, 9), (5, 4100), (4097, 10_000), (9_999, 10_000)):
        part = zo_kernels.noise_(torch.empty(b - a, device=device), key, 2, a, backend=backend)
        assert torch.equal(part, full[a:b]), (a, b)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_noise_stream_two_differs_from_stream_zero(backend, device):
    a = zo_kernels.noise_(torch.empty(64, device=device), KEYS[0], 0, backend=backend)
    b = zo_kernels.noise_(torch.empty(64, device=device), KEYS[0], 0, stream=2, backend=backend)
    assert_verbose_allclose(b.cpu(), N.normal(KEYS[0], 0, 64, stream=2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend,device", KERNELS)
def test_bad_input_errors_before_dispatch(backend, device):
    p = make_tensor(10, torch.float32, 0).to(device)
    keep = p.clone()
    with pytest.raises(ValueError, match="contiguous"):
        zo_kernels.noise_axpy_([p, torch.zeros(4, 4, device=device).t()], [1], [1.0], backend=backend)
    with pytest.raises(TypeError):
        zo_kernels.noise_axpy_([p, torch.zeros(4, dtype=torch.int32, device=device)], [1], [1.0], backend=backend)
    with pytest.raises(ValueError, match="alphas"):
        zo_kernels.noise_axpy_([p], [1, 2], [1.0], backend=backend)
    with pytest.raises(ValueError, match="dense"):
        zo_kernels.noise_axpy_([p], [1], [1.0], dense=[torch.zeros(3, device=device)], backend=backend)
    with pytest.raises(TypeError, match="float64"):
        zo_kernels.noise_axpy_([p.double()], [1], [1.0], backend=backend)
    assert torch.equal(p, keep)


# ------------------------------------------------------------------------------------ low rank
LOWRANK_KERNELS = targets("lowrank", reference=False)
LR_KU = [N.step_key(5, s) for s in range(3)]
LR_KV = N.step_key(5, 100)


def _lowrank_run(backend, params, **kw):
    """lowrank_noise_axpy_ on clones of `params`, asserting that `backend` ran it."""
    params = [p.clone() for p in params]
    zo_kernels.lowrank_noise_axpy_(params, backend=backend, **kw)
    assert zo_kernels.last_backend() == backend
    return [p.cpu() for p in params]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", LOWRANK_KERNELS)
def test_lowrank_matches_reference(backend, device, dtype, rounding):
    """Matrices (dim-0 shards at offsets, ids) and a vector in one call; the U-space dense term once."""
    shapes = [(5, 7), (37, 13), (3, 2, 4), (1, 3), (9,), (64, 33)]
    kw = dict(keys_u=LR_KU[:2], key_v=LR_KV, alphas=[0.5, -0.25], rank=3, gamma=0.99, rounding=rounding,
              tensor_ids=[2, 0, 5, 1, 4, 3], offsets=[0, 13 * 5, 0, 3, 0, 0], rounding_key=99)
    ps = [make_tensor(s, dtype, i).to(device) for i, s in enumerate(shapes)]
    if rounding == "nearest":
        kw.update(beta=0.5, dense=[make_tensor((s[0], 3), torch.float32, 50 + i).to(device) if len(s) >= 2
                                   else torch.zeros(s, dtype=dtype, device=device) for i, s in enumerate(shapes)])
    got, ref = _lowrank_run(backend, ps, **kw), _lowrank_run("reference", ps, **kw)
    for i, (p, q) in enumerate(zip(got, ref)):
        if dtype == torch.float32:
            assert (p - q).abs().max() <= 1e-5 * q.abs().clamp_min(1).max(), i
        else:
            # one ulp, or (near zero, where ulps are tiny) the fp32 sums' own difference
            off = (ordered(p) - ordered(q)).abs() > 1
            assert ((p.float() - q.float()).abs()[off] <= 1e-5).all(), i


@pytest.mark.parametrize("backend,device", LOWRANK_KERNELS)
def test_lowrank_exact_passes_match_reference(backend, device):
    """+μ recording residues, then restore + update reading them: within one ulp of the reference."""
    theta = [(make_tensor((40, 24), torch.float32, 10) * 0.02).to(torch.bfloat16).to(device)]
    out = {}
    for b in ("reference", backend):
        ps = [t.clone() for t in theta]
        planes = R.make_planes(ps, 2)
        zo_kernels.lowrank_noise_axpy_(ps, [LR_KU[0]], LR_KV, [1e-3], rank=2, undo=[0.0], planes=planes, backend=b)
        mid = ps[0].clone()
        zo_kernels.lowrank_noise_axpy_(ps, [LR_KU[0], LR_KU[1]], LR_KV, [-1e-3, 2e-3], rank=2, gamma=0.999,
                                       undo=[1e-3, 0.0], planes=planes, backend=b)
        out[b] = (mid.cpu(), ps[0].cpu(), planes[0].cpu())
    for x, y in zip(out["reference"][:2], out[backend][:2]):
        assert (ordered(x) - ordered(y)).abs().max() <= 1
    assert (out["reference"][2] != out[backend][2]).float().mean() < 0.02


# ------------------------------------------------------------------------------- exact restore
# The exact-restore form (docs/spec.md §4: noise_axpy_ with undo= / planes=).
EXACT = targets("axpy_exact")
EXACT_KERNELS = targets("axpy_exact", reference=False)
MU = 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", EXACT_KERNELS)
def test_exact_matches_reference(backend, device, dtype, bits):
    """+μ writing θ0's residues, −μ restoring from them, then restore and update (γ, α): the planes bit
    for bit; θ as the reference's, and in fp32 the last call as the float64 update of θ0."""
    theta0 = (make_tensor(1029, torch.float32, 2) * 0.02).to(dtype)
    k = N.step_key(9, 9)
    out = {}
    for be in (backend, "reference"):
        p = theta0.clone().to(device)
        planes = R.make_planes([p], bits)
        zo_kernels.noise_axpy_([p], [k], [MU], planes=planes, backend=be)
        assert zo_kernels.last_backend() == be
        out[be, "plane"] = planes[0].cpu()
        zo_kernels.noise_axpy_([p], [k], [-MU], undo=[MU], planes=planes, backend=be)
        zo_kernels.noise_axpy_([p], [k], [-0.5 * MU], undo=[-MU], gamma=0.999, planes=planes, backend=be)
        out[be] = p.cpu()
    assert torch.equal(out[backend, "plane"], out["reference", "plane"])
    if dtype == torch.float32:
        # fp32 sums follow z's round-off: within the spec's z bound times the coefficients.
        diff = (out[backend].double() - out["reference"].double()).abs().max().item()
        assert diff <= 3 * MU * 1e-5 * 6 + 4 * 2**-24 * 0.1
        e = exact_axpy([theta0], [k], [-0.5 * MU], gamma=0.999)[0]
        assert_close_to_reference(0, theta0, out[backend], out["reference"], e, dict(keys=[k], alphas=[-0.5 * MU]))
    else:
        # Backends agree except where fp32 z round-off moves a sum across a rounding boundary.
        assert (out[backend] != out["reference"]).double().mean().item() < 5e-3


def _cycles(p, planes, backend, cycles, naive=False):
    """`cycles` perturb (+μ) / restore (−2μ) / restore (+μ) cycles of ZO-SGD with zero gradient: fused
    (naive), or in the exact form (with planes, or without: undo=[0.0] starts the exact form)."""
    for c in range(cycles):
        k = N.step_key(5, c)
        if naive:
            for a in (MU, -2 * MU, MU):
                zo_kernels.noise_axpy_([p], [k], [a], backend=backend)
        else:
            zo_kernels.noise_axpy_([p], [k], [MU], undo=[0.0] if planes is None else None, planes=planes,
                                   backend=backend)
            zo_kernels.noise_axpy_([p], [k], [-MU], undo=[MU], planes=planes, backend=backend)
            zo_kernels.noise_axpy_([p], [k], [0.0], undo=[-MU], planes=planes, backend=backend)
    return p


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend,device", EXACT)
def test_exact_restore_cycles_drift_far_less_than_naive(backend, device, dtype):
    g = torch.Generator().manual_seed(1)
    theta0 = (torch.randn(4096, generator=g) * 0.02).to(dtype).to(device)
    naive = _rel(_cycles(theta0.clone(), None, backend, 20, naive=True), theta0)
    inverse = _rel(_cycles(theta0.clone(), None, backend, 20), theta0)
    p = theta0.clone()
    planed = _rel(_cycles(p, R.make_planes([p], 8), backend, 20), theta0)
    assert naive > 0
    assert inverse < naive / 4
    assert planed < naive / 100
    # One rounding per call bounds a single cycle: |restored - θ0| is at most an ulp-sized slip
    # only where the plane could not resolve the preimage.
    assert (p != theta0).double().mean().item() < 2e-3


@pytest.mark.parametrize("cuts", [(0, 3), (0, 3, 517)], ids=["1+", "3+514+"])
@pytest.mark.parametrize("backend,device", EXACT)
def test_exact_shards_equal_whole(backend, device, cuts):
    """Planes of shards at offsets (residues packed from a sub-byte position) restore as the whole does."""
    theta0 = (make_tensor(1030, torch.float32, 12) * 0.02).to(torch.bfloat16).to(device)
    a = theta0.clone()
    pa = R.make_planes([a], 4)
    b = theta0.clone()
    parts = [b[x:y] for x, y in zip(cuts, cuts[1:] + (b.numel(),))]
    pb = R.make_planes(parts, 4, offsets=list(cuts))
    k = N.step_key(1, 2)
    calls = (([a], pa, {}), (parts, pb, dict(tensor_ids=[0] * len(parts), offsets=list(cuts))))
    for ps, planes, kw in calls:
        zo_kernels.noise_axpy_(ps, [k], [MU], planes=planes, backend=backend, **kw)
    assert torch.equal(a, b) and not torch.equal(a, theta0)
    whole = R.unpack_residues(pa[0].cpu(), a.numel(), 0, 4)
    assert torch.equal(torch.cat([R.unpack_residues(q.cpu(), x.numel(), c, 4) for q, x, c in zip(pb, parts, cuts)]), whole)
    for ps, planes, kw in calls:
        zo_kernels.noise_axpy_(ps, [k], [0.0], undo=[MU], planes=planes, backend=backend, **kw)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- ZO-Adam
# The fused ZO-Adam pass (zo_kernels.noise_adam_) against the reference and a float64 transcription
# of Adam (tests/adam_helpers.py).  test_noise_adam.py runs ADAM_CASES on each CPU instruction set.
ADAM = targets("adam")
_ADAM_KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, step=4, weight_decay=0.05)
_ADAM_IDS_KW = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, step=2, weight_decay=0.01, offsets=[0, 6, 0, 4],
                    tensor_ids=[4, 1, 9, 2])
ADAM_CASES = [
    AdamCase("l2", _ADAM_KW),
    AdamCase("decoupled", dict(_ADAM_KW, decoupled=True)),
    *[AdamCase(f"ids-offsets-{r}", dict(_ADAM_IDS_KW, rounding=r), k=2, seed=7) for r in ("nearest", "stochastic")],
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ADAM_CASES, ids=[c.name for c in ADAM_CASES])
@pytest.mark.parametrize("backend,device", ADAM)
def test_adam_matches_reference_and_float64(backend, device, case, dtype):
    if backend == "reference" and dtype != torch.float32:
        pytest.skip("the reference is the oracle of 16-bit θ; its fp32 θ is checked against float64")
    check_adam_case(backend, device, case, dtype)


@pytest.mark.parametrize("backend,device", ADAM)
def test_adam_three_steps_bf16_params_track_float64(backend, device):
    check_three_steps(backend, device, torch.bfloat16)


@pytest.mark.parametrize("backend,device", ADAM)
def test_adam_shards_with_offsets_equal_the_whole(backend, device):
    """z depends on the global index: updating two halves (offsets) equals updating the whole."""
    p, m, v = (t.to(device) for t in adam_inputs(1001, torch.float32, 5))
    whole = [t.clone() for t in (p, m, v)]
    kw = dict(lr=1e-3, step=7, backend=backend)
    zo_kernels.noise_adam_([whole[0]], [whole[1]], [whole[2]], ADAM_KEYS, ADAM_COEFFS, **kw)
    halves = [t.clone() for t in (p, m, v)]
    a, b = [t[:498] for t in halves], [t[498:] for t in halves]
    zo_kernels.noise_adam_([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], ADAM_KEYS, ADAM_COEFFS, tensor_ids=[0, 0],
                           offsets=[0, 498], **kw)
    for w, h in zip(whole, halves):
        assert torch.equal(w, h)


# ------------------------------------------------------------------------------- Rademacher form
# docs/spec.md §9.  The signs are integer-exact and α·s = ±α exactly, so every op on every backend must
# give the reference's bits (the same IEEE float32 operations in the same order); the reference's own
# signs are held to the spec vectors and a scalar transcription in tests/test_noise_reference.py, its
# arithmetic to a float64 evaluation below.
RADEMACHER = dict(noise="rademacher")
# Shard cuts that are not multiples of 128 (nor of 4), and ones that are: sign blocks split every way.
SIGN_CUTS = [0, 1, 5, 127, 128, 131, 300, 517, 1001, 2100]
# The table's calls that together cover every size, several keys, both dense kinds, ids and offsets,
# stochastic rounding and mixed dtypes (the size-only rows add nothing for ±1 and cost interpreter time).
SIGN_CASES = [c for c in CASES + MIXED if c.name in ("4keys-gamma", "3keys-dense", "dense-mixed-dtypes", "ids-offsets",
                                                      "stochastic", "mixed-param-dtypes")]


def _assert_same_bits(got, ref, what):
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        assert torch.equal(a.cpu(), b.cpu()), f"{what}: tensor {i} differs from the reference"


def signs64(key, tid, numel, offset=0):
    return N.rademacher(key, tid, numel, offset=offset, dtype=torch.float64)


def test_rademacher_reference_matches_float64_evaluation():
    """The reference's fp32 sum θγ + Σ α s + β d is within a few fp32 roundings of the float64 value."""
    params = [make_tensor(s, torch.float32, i) for i, s in enumerate((5, 1023, (3, 5, 7)))]
    dense = [make_tensor(p.shape, torch.float32, 30 + i) for i, p in enumerate(params)]
    kw = dict(keys=KEYS[:3], alphas=ALPHAS[:3], gamma=0.97, dense=dense, beta=-0.3, offsets=[3, 0, 2**33 + 5],
              **RADEMACHER)
    got = run("reference", params, **kw)
    for i, (p, g) in enumerate(zip(params, got)):
        acc = p.double().reshape(-1) * 0.97 - 0.3 * dense[i].double().reshape(-1)
        for k, a in zip(KEYS[:3], ALPHAS[:3]):
            acc += a * signs64(k, i, p.numel(), kw["offsets"][i])
        scale = p.double().abs().reshape(-1) + sum(map(abs, ALPHAS[:3])) + dense[i].double().abs().reshape(-1)
        assert ((g.double().reshape(-1) - acc).abs() <= 5 * 2.0 ** -24 * scale).all(), i


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIGN_CASES, ids=[c.name for c in SIGN_CASES])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_rademacher_same_bits_as_reference(backend, device, case, dtype):
    params, kw = case.build(dtype, device)
    kw.update(RADEMACHER)
    _assert_same_bits(run(backend, params, **kw), run("reference", params, **kw), case.name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", TARGETS)
def test_rademacher_shards_equal_whole(backend, device, dtype):
    """Shards at offsets that split sign blocks anywhere equal the whole tensor updated at once."""
    whole = make_tensor(SIGN_CUTS[-1], dtype, 3).to(device)
    kw = dict(keys=KEYS[:3], alphas=ALPHAS[:3], gamma=0.9, tensor_ids=[4], rounding="stochastic", rounding_key=77,
              **RADEMACHER)
    ref = whole.clone()
    zo_kernels.noise_axpy_([ref], backend=backend, **kw)
    shards = [whole[a:b].clone() for a, b in zip(SIGN_CUTS, SIGN_CUTS[1:])]
    zo_kernels.noise_axpy_(shards, backend=backend, **dict(kw, tensor_ids=[4] * len(shards), offsets=SIGN_CUTS[:-1]))
    assert torch.equal(torch.cat(shards), ref)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_rademacher_spec_vectors(backend, device):
    """noise_(noise="rademacher") on the spec's `sign` and `sign_block` vectors, exactly (stream 5 by default)."""
    for v in spec_vectors()["sign"]:
        out = torch.empty(1, device=device)
        zo_kernels.noise_(out, v["key"], v["tensor_id"], v["index"], backend=backend, **RADEMACHER)
        assert out.item() == v["z"], v
    v = spec_vectors()["sign_block"]
    for first, n in ((v["first"], 128), (v["first"] + 3, 125), (v["first"] + 64, 37)):
        out = torch.empty(n, device=device)
        zo_kernels.noise_(out, v["key"], v["tensor_id"], first, backend=backend, **RADEMACHER)
        assert out.cpu().tolist() == v["z"][first - v["first"]:first - v["first"] + n]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", KERNELS)
def test_rademacher_noise_same_bits_as_reference(backend, device, dtype):
    """noise_: slices at any offset, every dtype, another stream; the same values as the reference."""
    key, n = KEYS[3], 4099
    for off, stream in ((0, None), (5, None), (2**40 + 129, None), (7, 0)):
        got = zo_kernels.noise_(torch.empty(n, dtype=dtype, device=device), key, 3, off, stream=stream,
                                backend=backend, **RADEMACHER)
        ref = zo_kernels.noise_(torch.empty(n, dtype=dtype), key, 3, off, stream=stream, backend="reference",
                                **RADEMACHER)
        assert torch.equal(got.cpu(), ref), (off, stream)
        assert torch.equal(ref.double(), signs64(key, 3, n, off) if stream is None else
                           N.rademacher(key, 3, n, offset=off, stream=stream, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [None, 2, 8])
@pytest.mark.parametrize("backend,device", targets("axpy_exact", reference=False))
def test_rademacher_exact_form_same_bits_as_reference(backend, device, bits, dtype):
    """Perturb (+μ, planes written), restore-and-flip, restore-and-update (stochastic): every tensor and
    plane as the reference's; the cycle brings θ back where the plane resolves it."""
    theta0 = [(make_tensor(s, torch.float32, 20 + i) * 0.02).to(dtype).to(device) for i, s in enumerate((1031, 130))]
    out = {}
    for be in (backend, "reference"):
        ps = [t.clone() for t in theta0]
        kw = dict(tensor_ids=[0, 5], offsets=[3, 2**33 + 1], backend=be, **RADEMACHER)
        planes = R.make_planes(ps, bits, offsets=kw["offsets"]) if bits else None
        k = KEYS[:2]
        zo_kernels.noise_axpy_(ps, k, [MU, -MU], undo=None if planes else [0.0, 0.0], planes=planes, **kw)
        zo_kernels.noise_axpy_(ps, k, [-MU, MU], undo=[MU, -MU], planes=planes, **kw)
        after = [t.clone() for t in ps]
        zo_kernels.noise_axpy_(ps, k, [0.3 * MU, 0.0], undo=[-MU, MU], gamma=0.999, planes=planes,
                               rounding="stochastic", rounding_key=5, **kw)
        out[be] = (after, ps, planes or [])
    for a, b in zip(out[backend], out["reference"]):
        _assert_same_bits(a, b, f"exact form, {bits}-bit planes")


def _adam_ieee(theta, m, v, g, sc):
    """docs/spec.md §8's update in float32, one IEEE operation per step with a correctly rounded square
    root (via float64: exact for float32 inputs).  zo_kernels.adam.adam_update is the same sequence with
    torch.sqrt, which on CPU is not correctly rounded (Sleef, within 1 ulp)."""
    f = lambda x: torch.tensor(x, dtype=torch.float32)   # noqa: E731 - each scalar rounded once
    g = g + f(sc.l2) * theta
    m = f(sc.beta1) * m + f(1.0 - sc.beta1) * g
    v = f(sc.beta2) * v + f(1.0 - sc.beta2) * (g * g)
    denom = torch.sqrt(v.double()).float() / f(sc.bc2_sqrt) + f(sc.eps)
    return f(sc.gamma) * theta - f(sc.step_size) * (m / denom), m, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ADAM_CASES, ids=[c.name for c in ADAM_CASES])
@pytest.mark.parametrize("backend,device", targets("adam", reference=False))
def test_rademacher_adam_same_bits(backend, device, case, dtype):
    """noise_adam_ with g = Σ c_j s_j: m and v as the reference's bit for bit; θ's float32 value as the
    spec's IEEE sequence (_adam_ieee) bit for bit, then rounded as the reference rounds it (so 16-bit θ
    as the reference's wherever the reference's own torch.sqrt agrees).  The reference's θ itself is
    within a few ulps (its square root is not correctly rounded)."""
    from zo_kernels.adam import AdamScalars

    tensors = case.build(dtype)
    kw = dict(case.kw)
    got, ref = (run_adam(be, device, tensors, ADAM_KEYS[:case.k], ADAM_COEFFS[:case.k], **RADEMACHER, **kw)
                for be in (backend, "reference"))
    _assert_same_bits(got[1] + got[2], ref[1] + ref[2], case.name + " m, v")
    sc = AdamScalars.make(kw["lr"], *kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8), kw["step"],
                          kw.get("weight_decay", 0.0), kw.get("decoupled", False))
    tids, offs = kw.get("tensor_ids", range(4)), kw.get("offsets", [0] * 4)
    for i, (p, m, v) in enumerate(zip(*tensors)):
        g = sum(c * N.rademacher(k, tids[i], p.numel(), offset=offs[i])
                for k, c in zip(ADAM_KEYS[:case.k], ADAM_COEFFS[:case.k]))
        th, _, _ = _adam_ieee(p.float().reshape(-1), m.reshape(-1), v.reshape(-1), g, sc)
        if dtype == torch.float32:
            assert torch.equal(got[0][i].reshape(-1), th), (case.name, i)
            assert ((got[0][i] - ref[0][i]).abs() <= 2.0 ** -21 * (ref[0][i].abs() + sc.step_size)).all()
        elif kw.get("rounding") == "stochastic":
            rk = default_rounding_key(ADAM_KEYS[:case.k], ADAM_COEFFS[:case.k], sc.gamma, sc.step_size)
            words = N.random_words(rk, tids[i], p.numel(), offset=offs[i])
            assert torch.equal(got[0][i].reshape(-1), N.stochastic_round(th, dtype, words)), (case.name, i)
        else:
            assert torch.equal(got[0][i].reshape(-1), th.to(dtype)), (case.name, i)


def test_rademacher_adam_reference_is_adam_with_sign_gradient():
    """The reference's noise_adam_(noise="rademacher") against the float64 transcription of Adam with
    g = Σ c_j s_j (s from the spec's statement via zo_kernels.noise.rademacher)."""
    from adam_helpers import adam64

    p, m, v = adam_inputs(1023, torch.float32, 3)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, step=4, weight_decay=0.05)
    g = sum(c * signs64(k, 0, 1023) for k, c in zip(ADAM_KEYS, ADAM_COEFFS))
    want, wm, wv = adam64(p, m, v, g, **kw)
    zo_kernels.noise_adam_([p], [m], [v], ADAM_KEYS, ADAM_COEFFS, backend="reference", **RADEMACHER, **kw)
    assert torch.allclose(m.double(), wm, rtol=1e-6, atol=1e-7) and torch.allclose(v.double(), wv, rtol=1e-6)
    assert torch.allclose(p.double(), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ opcheck
@dataclass(frozen=True)
class OpCall:
    """One call of a registered op for torch.library.opcheck: args(backend, device) -> the op's arguments
    (internal native ops: args(device)).  `needs`: the Backend field the op needs (None: every backend)."""

    name: str
    op: Callable
    args: Callable
    needs: Optional[str] = None


def _key(s=2):
    return N.to_signed64(N.step_key(1, s))


def _sigmas(params, scaled):
    """The scaled form's σ for the op's `scale` list (docs/spec.md §10): empty, or one positive tensor each."""
    return [make_tensor(p.shape, torch.float32, 90 + i).abs().to(p.device) + 0.5
            for i, p in enumerate(params)] if scaled else []


def _axpy_args(backend, device, noise="gaussian", scaled=False):
    p = [make_tensor(37, torch.float32, 0).to(device), make_tensor((3, 5), torch.bfloat16, 1).to(device)]
    return (p, [_key()], [0.5], 0.9, [], 0.0, "stochastic", [0, 1], [0, 3], 7, noise, _sigmas(p, scaled), backend)


def _axpy_dense_args(backend, device, noise="gaussian", scaled=False):
    p = [make_tensor(10, torch.float32, 0).to(device), make_tensor((3, 5), torch.float32, 1).to(device)]
    d = [make_tensor(10, torch.float32, 2).to(device), make_tensor((3, 5), torch.bfloat16, 3).to(device)]
    return (p, [_key(), _key(3)], [0.5, -0.1], 1.0, d, 0.25, "nearest", [0, 1], [0, 0], 0, noise, _sigmas(p, scaled),
            backend)


def _exact_args(backend, device, noise="gaussian", scaled=False):
    q = [make_tensor(37, torch.bfloat16, 4).to(device)]
    return (q, [_key()], [1e-3], [0.0], 1.0, R.make_planes(q, 2), 2, "nearest", [0], [0], 7, noise,
            _sigmas(q, scaled), backend)


def _noise_args(backend, device, noise="gaussian"):
    return (torch.empty(9, device=device), _key(), 3, 2, N.default_stream(noise), noise, backend)


def _adam_args(backend, device, noise="gaussian"):
    from zo_kernels.adam import AdamScalars

    p = [make_tensor(10, torch.float32, 0).to(device), make_tensor((3, 5), torch.bfloat16, 1).to(device)]
    m = [torch.zeros(t.shape, device=device) for t in p]
    v = [torch.ones(t.shape, device=device) for t in p]
    scal = AdamScalars.make(1e-3, 0.9, 0.999, 1e-8, 1).as_list()
    return (p, m, v, [_key()], [0.5], scal, "nearest", [0, 1], [0, 0], 0, noise, backend)


def _rademacher(args):
    """An args function of the table above with noise="rademacher"."""
    return lambda backend, device: args(backend, device, "rademacher")


def _scaled(args):
    """An args function of the table above with the scaled form's σ (docs/spec.md §10)."""
    return lambda backend, device: args(backend, device, scaled=True)


def _lowrank_args(backend, device):
    p = [make_tensor((6, 5), torch.float32, 0).to(device), make_tensor(7, torch.float32, 1).to(device)]
    return (p, [_key()], _key(3), [0.5], [], 0.9, [], 0.0, [], 2, 2, "nearest", [0, 1], [0, 0], 0, backend)


OPS = torch.ops.zo_kernels
OPCHECKS = [
    OpCall("noise_axpy_", lambda: OPS.noise_axpy_.default, _axpy_args),
    OpCall("noise_axpy_-dense", lambda: OPS.noise_axpy_.default, _axpy_dense_args),
    OpCall("noise_axpy_exact_", lambda: OPS.noise_axpy_exact_.default, _exact_args, "axpy_exact"),
    OpCall("noise_", lambda: OPS.noise_.default, _noise_args),
    OpCall("noise_adam_", lambda: OPS.noise_adam_.default, _adam_args, "adam"),
    OpCall("noise_axpy_-rademacher", lambda: OPS.noise_axpy_.default, _rademacher(_axpy_dense_args)),
    OpCall("noise_axpy_exact_-rademacher", lambda: OPS.noise_axpy_exact_.default, _rademacher(_exact_args),
           "axpy_exact"),
    OpCall("noise_-rademacher", lambda: OPS.noise_.default, _rademacher(_noise_args)),
    OpCall("noise_adam_-rademacher", lambda: OPS.noise_adam_.default, _rademacher(_adam_args), "adam"),
    OpCall("lowrank_noise_axpy_", lambda: OPS.lowrank_noise_axpy_.default, _lowrank_args, "lowrank"),
    OpCall("noise_axpy_-scaled", lambda: OPS.noise_axpy_.default, _scaled(_axpy_dense_args), "scaled"),
    OpCall("noise_axpy_exact_-scaled", lambda: OPS.noise_axpy_exact_.default, _scaled(_exact_args), "scaled"),
]
# The native backends' internal ops (registered by zo_kernels._C) are ops too: args(backend, device)
# without the trailing backend name.
NATIVE_OPCHECKS = [
    OpCall("_noise_axpy_native", lambda: OPS._noise_axpy_native.default,
           lambda d: ([make_tensor(10, torch.float32, 0).to(d)], [_key()], [0.5], 1.0, [], 0.0, 0, [0], [0], 0, 1, [])),
    OpCall("_noise_native", lambda: OPS._noise_native.default, lambda d: _noise_args(None, d)[:-2] + (0,)),
    OpCall("_noise_axpy_exact_native", lambda: OPS._noise_axpy_exact_native.default,
           lambda d: _exact_args(None, d)[:7] + (0,) + _exact_args(None, d)[8:-3] + (1, [])),
    OpCall("_noise_axpy_native-scaled", lambda: OPS._noise_axpy_native.default,
           lambda d: (lambda a: a[:6] + (0,) + a[7:10] + (1, a[11]))(_axpy_dense_args(None, d, scaled=True))),
    OpCall("_noise_adam_native", lambda: OPS._noise_adam_native.default,
           lambda d: _adam_args(None, d)[:6] + (0,) + _adam_args(None, d)[7:-2] + (1,)),
    OpCall("_lowrank_axpy_native", lambda: OPS._lowrank_axpy_native.default,
           lambda d: (lambda a: ([a[0][0]],) + a[1:8] + (a[8], a[9], a[10], 0, [0], [0], 0))(_lowrank_args(None, d))),
]


# opcheck tests what an op's registration promises (schema mutability and aliasing, the fake kernel,
# autograd registration, AOT dispatch): the op's, not a backend's, so it runs once per call above (each
# a distinct schema path) and device, through the reference backend (it implements every op).  What
# each backend's kernel writes is held to the reference by the tests above; the native backends'
# internal ops get their own opcheck below.
OPCHECK_BACKEND = "reference"


@pytest.mark.parametrize("call", OPCHECKS, ids=[c.name for c in OPCHECKS])
@pytest.mark.parametrize("device", devices(names=(OPCHECK_BACKEND,)))
def test_opcheck(device, call):
    assert call.needs is None or getattr(backends.get(OPCHECK_BACKEND), call.needs) is not None
    torch.library.opcheck(call.op(), call.args(OPCHECK_BACKEND, device))


@pytest.mark.parametrize("call", NATIVE_OPCHECKS, ids=[c.name for c in NATIVE_OPCHECKS])
@pytest.mark.parametrize("device", devices(names=("cpu", "cuda")))
def test_opcheck_native_ops(device, call):
    if not hasattr(OPS, call.name):
        pytest.skip(f"zo_kernels._C has no {call.name} (built without it on {device})")
    torch.library.opcheck(call.op(), call.args(device))
