"""Exact restore: undoing a rounded perturbation by inverting the rounding (zo_kernels.restore): the
ordered grid, the residue planes, the inverse, and the form's input checks.  Every backend's exact
form against the reference (and its drift over perturb / restore cycles): test_backend_conformance.py."""
import pytest
import torch

import zo_kernels
from zo_kernels import backends
from zo_kernels import noise as N
from zo_kernels import restore as R

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
