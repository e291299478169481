"""Exact restore: undoing a rounded perturbation by inverting the rounding (zo_kernels.restore)."""
import pytest
import torch

import zo_kernels
from zo_kernels import backends
from zo_kernels import noise as N
from zo_kernels import restore as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT_BACKENDS = [b for b in zo_kernels.available_backends()
                  if backends.get(b).axpy_exact is not None and DEVICE in backends.get(b).devices]
HALF = [torch.bfloat16, torch.float16]
MU = 1e-3


@pytest.mark.parametrize("dtype", HALF)
def test_ordered_positions_are_monotone_and_invertible(dtype):
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = x[torch.isfinite(x.float())]
    o = R.to_ordered(x)
    assert torch.equal(R.from_ordered(o, dtype).view(torch.int16), x.view(torch.int16))
    order = torch.argsort(o)
    vals = x[order].double()
    assert bool((vals[1:] >= vals[:-1]).all())  # equal only for -0 / +0
    assert int((vals[1:] == vals[:-1]).sum()) == 1


@pytest.mark.parametrize("bits", R.PLANE_BITS)
@pytest.mark.parametrize("numel,offset", [(1, 0), (7, 0), (9, 3), (4097, 2)])
def test_plane_pack_round_trip(bits, numel, offset):
    res = torch.randint(0, 1 << bits, (numel,), dtype=torch.int64)
    plane = R.pack_residues(res, numel, offset, bits)
    assert plane.numel() == R.plane_numel_bytes(numel, offset, bits)
    assert torch.equal(R.unpack_residues(plane, numel, offset, bits), res)


def _perturbed(dtype, n=1 << 16, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta0 = (torch.randn(n, generator=g) * 0.02).to(dtype)
    s = MU * N.normal(N.step_key(seed, 1), 0, n)
    y = (theta0.float() + s).to(dtype)
    return theta0, s, y


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("bits", [0, 2, 4, 8])
def test_inverse_is_a_preimage_and_exact_where_unambiguous(dtype, bits):
    theta0, s, y = _perturbed(dtype)
    res = R.to_ordered(theta0) & ((1 << bits) - 1) if bits else None
    got, ambiguous = R.invert(y, s, res, bits)
    # Always a valid preimage: the forward rounding maps it back to y.
    assert torch.equal((got.float() + s).to(dtype), y)
    # Unambiguous elements come back bit-exact.
    clear = ~ambiguous
    assert torch.equal(got[clear].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       theta0[clear].view(torch.int16 if dtype != torch.float32 else torch.int32))
    # More plane bits resolve more elements.
    frac = ambiguous.double().mean().item()
    assert frac < {0: 0.2, 2: 0.02, 4: 0.005, 8: 0.001}[bits]


def _cycles(p, planes, backend, cycles, naive=False):
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


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_perturb_restore_cycles_drift_far_less_than_naive(backend, dtype):
    g = torch.Generator().manual_seed(1)
    theta0 = (torch.randn(4096, generator=g) * 0.02).to(dtype).to(DEVICE)
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


@pytest.mark.parametrize("backend", [b for b in EXACT_BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_backend_exact_mode_matches_reference(backend, dtype, bits):
    g = torch.Generator().manual_seed(2)
    theta0 = (torch.randn(1029, generator=g) * 0.02).to(dtype)
    out = {}
    for be in (backend, "reference"):
        p = theta0.clone().to(DEVICE)
        planes = R.make_planes([p], bits)
        k = N.step_key(9, 9)
        zo_kernels.noise_axpy_([p], [k], [MU], planes=planes, backend=be)
        out[be, "plane"] = planes[0].clone()
        zo_kernels.noise_axpy_([p], [k], [-MU], undo=[MU], planes=planes, backend=be)
        out[be, "minus"] = p.clone()
        zo_kernels.noise_axpy_([p], [k], [-0.5 * MU], undo=[-MU], gamma=0.999, planes=planes, backend=be)
        out[be] = p.cpu()
    assert torch.equal(out[backend, "plane"].cpu(), out["reference", "plane"].cpu())
    if dtype == torch.float32:
        # fp32 sums follow z's round-off: within the spec's z bound times the coefficients.
        diff = (out[backend].double() - out["reference"].double()).abs().max().item()
        assert diff <= 3 * MU * 1e-5 * 6 + 4 * 2**-24 * 0.1
    else:
        # Backends agree except where fp32 z round-off moves a sum across a rounding boundary.
        assert (out[backend] != out["reference"]).double().mean().item() < 5e-3


def test_exact_mode_with_offsets_and_lists_matches_single_tensor():
    theta0 = (torch.randn(1030) * 0.02).to(torch.bfloat16)
    a = theta0.clone()
    pa = R.make_planes([a], 4)
    b = theta0.clone()
    parts = [b[:3], b[3:]]
    pb = R.make_planes(parts, 4, offsets=[0, 3])
    k = N.step_key(1, 2)
    for p, planes, kw in ((a, pa, {}), (parts, pb, dict(tensor_ids=[0, 0], offsets=[0, 3]))):
        plist = p if isinstance(p, list) else [p]
        zo_kernels.noise_axpy_(plist, [k], [MU], planes=planes, backend="reference", **kw)
        zo_kernels.noise_axpy_(plist, [k], [0.0], undo=[MU], planes=planes, backend="reference", **kw)
    assert torch.equal(a, b)


def test_exact_mode_rejects_dense_and_bad_planes():
    p = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no dense"):
        zo_kernels.noise_axpy_([p], [1], [1.0], undo=[0.0], dense=[torch.zeros(8)], beta=1.0)
    with pytest.raises(ValueError, match="undo has 2"):
        zo_kernels.noise_axpy_([p], [1], [1.0], undo=[0.0, 1.0])
    with pytest.raises(TypeError, match="uint8"):
        zo_kernels.noise_axpy_([p], [1], [1.0], planes=[torch.zeros(2)])
    with pytest.raises(ValueError, match="do not match"):
        zo_kernels.noise_axpy_([p], [1], [1.0], planes=[torch.zeros(3, dtype=torch.uint8)])
    assert torch.equal(p, torch.zeros(8, dtype=torch.bfloat16))


def test_backend_without_exact_form_says_so(monkeypatch):
    ref = backends.get("reference")
    monkeypatch.setitem(backends._REGISTRY, "plain", backends.Backend(
        "plain", ("cpu",), ref.dtypes, ref.axpy, ref.noise))
    with pytest.raises(NotImplementedError, match="does not implement exact restore"):
        zo_kernels.noise_axpy_([torch.zeros(4)], [1], [1.0], undo=[0.0], backend="plain")
