"""The scaled form of the primitive (docs/spec.md §10): noise_axpy_ and its exact-restore form with
scale=σ, θ ← γθ + Σ_j α_j (σ ⊙ z_j) + β·d, on every backend that declares it (Backend.scaled; the
others must refuse it by name), against a float64 evaluation and the reference."""
from __future__ import annotations

import re

import pytest
import torch

import zo_kernels
from zo_kernels import backends
from zo_kernels import noise as N
from zo_kernels import restore as R

from backends_helpers import targets
from helpers import z_bound
from native_helpers import make_tensor, ordered, run

SCALED = targets("scaled")
SCALED_KERNELS = targets("scaled", reference=False)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = (1, 5, 1023, (3, 5, 7))
KEYS = [N.step_key(11, s) for s in range(3)]
ALPHAS = [1e-3, -2e-3, 0.5]
RADEMACHER = dict(noise="rademacher")


def sigmas(params, device, seed=50):
    """Positive σ in [0.25, 4), float32, one per param (HiZOO's 1/√h lives in such a range)."""
    return [(0.25 * 16 ** make_tensor(p.shape, torch.float32, seed + i).abs().clamp(max=1)).to(device)
            for i, p in enumerate(params)]


def float64_scaled(params, scale, keys, alphas, gamma=1.0, dense=None, beta=0.0, tensor_ids=None, offsets=None,
                   noise="gaussian"):
    """The scaled form in float64 with float64 noise: what the fp32 paths approximate."""
    out = []
    for i, p in enumerate(params):
        tid = i if tensor_ids is None else tensor_ids[i]
        off = 0 if offsets is None else offsets[i]
        s = scale[i].double().cpu().reshape(-1)
        acc = p.double().cpu().reshape(-1) * gamma
        for k, a in zip(keys, alphas):
            acc = acc + a * s * N.noise_values(noise, k, tid, p.numel(), offset=off, dtype=torch.float64)
        if dense is not None:
            acc = acc + beta * dense[i].double().cpu().reshape(-1)
        out.append(acc)
    return out


CALLS = {
    "keys-gamma": dict(keys=KEYS, alphas=ALPHAS, gamma=0.999),
    "dense": dict(keys=KEYS[:2], alphas=ALPHAS[:2], gamma=0.97, beta=-0.3, dense=True),
    "ids-offsets": dict(keys=KEYS[:2], alphas=ALPHAS[:2], tensor_ids=[9, 0, 2**32 - 1, 5],
                        offsets=[1, 2**33 + 1, 3, 6]),
    "stochastic": dict(keys=KEYS[:2], alphas=ALPHAS[:2], rounding="stochastic", rounding_key=N.step_key(1, 2)),
}


def build(call, dtype, device):
    params = [make_tensor(s, dtype, i).to(device) for i, s in enumerate(SIZES)]
    kw = dict(CALLS[call])
    if kw.pop("dense", False):
        kw["dense"] = [make_tensor(s, torch.float32, 100 + i).to(device) for i, s in enumerate(SIZES)]
    return params, dict(kw, scale=sigmas(params, device))


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", SCALED)
def test_scaled_matches_float64_and_reference(backend, device, dtype, call):
    params, kw = build(call, dtype, device)
    got = run(backend, params, **kw)
    ref = run("reference", params, **kw)
    exact = float64_scaled(params, kw["scale"], kw["keys"], kw["alphas"], kw.get("gamma", 1.0), kw.get("dense"),
                           kw.get("beta", 0.0), kw.get("tensor_ids"), kw.get("offsets"))
    for i, (f, r, e, p) in enumerate(zip(got, ref, exact, params)):
        f, r = f.cpu().reshape(-1), r.cpu().reshape(-1)
        if dtype == torch.float32:
            tid = i if kw.get("tensor_ids") is None else kw["tensor_ids"][i]
            off = 0 if kw.get("offsets") is None else kw["offsets"][i]
            # per key the fp32 noise is off by its z bound times σ ≤ 4; the rest is fp32 rounding (a few ulps
            # of the magnitudes summed)
            bound = 4 * z_bound(kw["keys"], kw["alphas"], tid, p.numel(), off)
            mags = p.double().cpu().abs().reshape(-1) + 4 * sum(abs(a) for a in kw["alphas"]) * 6
            if kw.get("dense") is not None:
                mags = mags + kw["dense"][i].double().cpu().abs().reshape(-1)
            assert ((f.double() - e).abs() <= bound + 6 * 2.0 ** -24 * mags).all(), f"tensor {i}"
            assert ((r.double() - e).abs() <= bound + 6 * 2.0 ** -24 * mags).all(), f"reference, tensor {i}"
        elif kw.get("rounding") != "stochastic":
            # round to nearest of the fp32 sum: at most one grid step from the float64 value's rounding
            assert (ordered(f) - ordered(e.to(dtype))).abs().max().item() <= 1, f"tensor {i}"
            assert (ordered(f) - ordered(r)).abs().max().item() <= 1, f"tensor {i}"
        else:
            assert (ordered(f) - ordered(r)).abs().max().item() <= 1, f"tensor {i}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("backend,device", SCALED_KERNELS)
def test_scaled_rademacher_same_bits_as_reference(backend, device, call, dtype):
    """σ·s is ±σ exactly, so every backend computes the reference's IEEE sequence: the same bits."""
    params, kw = build(call, dtype, device)
    kw.update(RADEMACHER)
    for i, (a, b) in enumerate(zip(run(backend, params, **kw), run("reference", params, **kw))):
        assert torch.equal(a.cpu(), b.cpu()), f"tensor {i}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", SCALED)
def test_unit_scale_is_the_unscaled_op_bit_for_bit(backend, device, dtype):
    """fmul(1, z) = z: scale of ones gives the bits of the call without scale (both forms)."""
    params, kw = build("keys-gamma", dtype, device)
    ones = [torch.ones_like(s) for s in kw.pop("scale")]
    for a, b in zip(run(backend, params, **kw), run(backend, params, scale=ones, **kw)):
        assert torch.equal(a, b)
    for kw_e in (dict(undo=[0.0] * 3), dict(undo=[1e-3, 0.0, -2e-3])):
        a = [p.clone() for p in params]
        b = [p.clone() for p in params]
        zo_kernels.noise_axpy_(a, KEYS, ALPHAS, backend=backend, **kw_e)
        zo_kernels.noise_axpy_(b, KEYS, ALPHAS, backend=backend, scale=ones, **kw_e)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", SCALED)
def test_scaled_exact_restore_returns_theta_bit_for_bit(backend, device, dtype, noise):
    """+μσz (planes written), −2μσz (undo +μ, planes read), back (undo −μ): θ0 exactly; the planes and every
    intermediate as the reference's for the Rademacher form (same bits), and the final θ0 for both.  θ0 near 1:
    each preimage run is within the planes' 2**4 points (§4), so the restore is exact by the spec."""
    theta0 = [(1 + make_tensor(s, torch.float32, 2 + i) * 0.02).to(dtype).to(device) for i, s in enumerate(SIZES)]
    scale = sigmas(theta0, device, 70)
    k, mu = N.step_key(9, 9), 1e-3
    out = {}
    for be in (backend, "reference"):
        p = [t.clone() for t in theta0]
        planes = R.make_planes(p, 4)
        zo_kernels.noise_axpy_(p, [k], [mu], planes=planes, scale=scale, backend=be, noise=noise)
        out[be, 1] = [t.cpu().clone() for t in p]
        zo_kernels.noise_axpy_(p, [k], [-mu], undo=[mu], planes=planes, scale=scale, backend=be, noise=noise)
        out[be, 2] = [t.cpu().clone() for t in p]
        zo_kernels.noise_axpy_(p, [k], [0.0], undo=[-mu], planes=planes, scale=scale, backend=be, noise=noise)
        out[be] = [t.cpu() for t in p]
        out[be, "planes"] = [pl.cpu() for pl in planes]
        assert all(torch.equal(a, b.cpu()) for a, b in zip(out[be], theta0)), be
    assert all(torch.equal(a, b) for a, b in zip(out[backend, "planes"], out["reference", "planes"]))
    if noise == "rademacher":
        for step in (1, 2):
            assert all(torch.equal(a, b) for a, b in zip(out[backend, step], out["reference", step])), step


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("backend,device", SCALED)
def test_bf16_sigma_is_its_float32_value_bit_for_bit(backend, device, noise):
    """A bfloat16 σ widens to float32 exactly, and §10's arithmetic starts from that float32 value: both forms
    give the bits of the float32 σ holding the same values (itself checked against float64 above), also with
    the param dtypes and σ dtypes mixed in one call (σ of both dtypes in one call: a launch per dtype)."""
    params, kw = build("ids-offsets", torch.bfloat16, device)
    params[1] = params[1].float()
    wide = [s.to(torch.bfloat16).float() for s in kw.pop("scale")]
    assert any(not torch.equal(s, w) for s, w in zip(sigmas(params, device), wide))   # σ really was rounded
    for narrow in ([s.to(torch.bfloat16) for s in wide], [s.to(torch.bfloat16) if i % 2 else s
                                                          for i, s in enumerate(wide)]):
        for a, b in zip(run(backend, params, scale=narrow, noise=noise, **kw),
                        run(backend, params, scale=wide, noise=noise, **kw)):
            assert torch.equal(a, b)
        a = [p.clone() for p in params]
        b = [p.clone() for p in params]
        for out, sc in ((a, narrow), (b, wide)):
            zo_kernels.noise_axpy_(out, kw["keys"], kw["alphas"], undo=[1e-3, -2e-3], scale=sc, backend=backend,
                                   tensor_ids=kw["tensor_ids"], offsets=kw["offsets"], noise=noise)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend,device", SCALED)
def test_scaled_shards_equal_whole(backend, device):
    """A shard at its global offset with its slice of σ equals that slice of the whole tensor's update."""
    whole = make_tensor(6001, torch.bfloat16, 3).to(device)
    sigma = sigmas([whole], device)[0]
    cuts = [0, 1, 130, 4001, 6001]
    kw = dict(keys=KEYS, alphas=ALPHAS, gamma=0.9, rounding="stochastic", rounding_key=77)
    ref = whole.clone()
    zo_kernels.noise_axpy_([ref], backend=backend, tensor_ids=[4], scale=[sigma], **kw)
    shards = [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    zo_kernels.noise_axpy_(shards, backend=backend, tensor_ids=[4] * 4, offsets=cuts[:-1],
                           scale=[sigma[a:b].clone() for a, b in zip(cuts, cuts[1:])], **kw)
    assert torch.equal(torch.cat(shards), ref)


def _bad(p):
    return {
        "count": ([torch.ones(4)], "scale has 1 tensors for 2 params"),
        "shape": ([torch.ones(4), torch.ones(3, 2)], "scale[1] has shape (3, 2)"),
        "dtype": ([torch.ones(4), torch.ones(6, dtype=torch.float16)], "scale[1] has dtype torch.float16"),
        "contiguous": ([torch.ones(4), torch.ones(6, 2)[:, 0]], "scale[1] is not contiguous"),
        "not a tensor": ([torch.ones(4), [1.0] * 6], "scale[1] must be a torch.Tensor"),
        "aliases a param": ([torch.ones(4), p[1]], "share memory"),
    }


@pytest.mark.parametrize("case", list(_bad([None, None])))
def test_bad_scale_raises_before_anything_is_written(case):
    p = [torch.randn(4), torch.randn(6).abs()]
    before = [t.clone() for t in p]
    scale, msg = _bad(p)[case]
    with pytest.raises((TypeError, ValueError), match=re.escape(msg)):
        zo_kernels.noise_axpy_(p, [1], [1.0], scale=scale, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(p, before))


def test_a_backend_without_the_scaled_form_refuses_it_by_name(monkeypatch):
    """Backend.scaled None: scale= is refused naming the backend (never silently dropped); the unscaled op runs."""
    monkeypatch.setattr(backends.get("reference"), "scaled", None)
    p = torch.randn(8)
    before = p.clone()
    with pytest.raises(NotImplementedError, match="backend 'reference' does not implement scale="):
        zo_kernels.noise_axpy_([p], [1], [1.0], scale=[torch.ones(8)], backend="reference")
    assert torch.equal(p, before)
    zo_kernels.noise_axpy_([p], [1], [1.0], backend="reference")
    assert not torch.equal(p, before)


@pytest.mark.parametrize("backend", [n for n in zo_kernels.available_backends() if backends.get(n).scaled is None])
def test_available_backends_without_scale_refuse(backend):
    dev = "cuda" if "cuda" in backends.get(backend).devices and torch.cuda.is_available() else "cpu"
    p = torch.randn(8, device=dev)
    with pytest.raises(NotImplementedError, match=f"backend {backend!r} does not implement scale="):
        zo_kernels.noise_axpy_([p], [1], [1.0], scale=[torch.ones(8, device=dev)], backend=backend)


@pytest.mark.parametrize("backend,device", [p for p in SCALED_KERNELS if p.values == ("cpu", "cpu")])
def test_cpu_kernel_same_bits_on_every_instruction_set(backend, device):
    """The C++ kernel's scaled form (plain and exact) gives the same bits on every instruction set it can run."""
    from zo_kernels import native

    params, kw = build("ids-offsets", torch.bfloat16, "cpu")
    out = {}
    for isa in native.cpu_isas():
        with native.on_isa(isa):
            plain = run("cpu", params, **kw)
            ex = [p.clone() for p in params]
            zo_kernels.noise_axpy_(ex, KEYS[:2], ALPHAS[:2], undo=[1e-3, 0.0], scale=kw["scale"], backend="cpu",
                                   tensor_ids=kw["tensor_ids"], offsets=kw["offsets"])
            out[isa] = plain + ex
    base = out[native.cpu_isas()[0]]
    assert len(out) >= 1
    for isa, got in out.items():
        assert all(torch.equal(a, b) for a, b in zip(got, base)), isa


@pytest.mark.parametrize("backend,device", [p for p in SCALED_KERNELS if p.values == ("cpu", "cpu")])
def test_native_op_checks_its_scale(backend, device):
    """The internal op refuses a bad σ itself (count, dtype, elements), before writing."""
    ops = torch.ops.zo_kernels
    p = torch.zeros(8)
    for scale, msg in (([torch.ones(8), torch.ones(8)], "scale has 2 tensors for 1 params"),
                       ([torch.ones(8, dtype=torch.float64)], "contiguous float32"),
                       ([torch.ones(7)], "scale\\[0\\] has 7 elements")):
        with pytest.raises(RuntimeError, match=msg):
            ops._noise_axpy_native([p], [1], [1.0], 1.0, [], 0.0, 0, [0], [0], 0, 0, scale)
        with pytest.raises(RuntimeError, match=msg):
            ops._noise_axpy_exact_native([p], [1], [1.0], [0.0], 1.0, [], 2, 0, [0], [0], 0, 0, scale)
    assert torch.equal(p, torch.zeros(8))
