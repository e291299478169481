"""The oracle of the fused ZO-Adam pass (zo_kernels.noise_adam_): a float64 transcription of Adam
(Kingma & Ba, Algorithm 1) with the gradient g = Σ_j c_j z_j, z materialised in float64 with noise_,
its fp32 error bounds, and the checks of one backend against it and against the reference
(test_backend_conformance.py runs them on every backend, test_noise_adam.py on each CPU instruction set)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import zo_kernels
from zo_kernels import noise as N

from helpers import z_bound
from native_helpers import make_tensor, ordered

KEYS = [N.step_key(3, s) for s in range(3)]
COEFFS = [0.7, -1.3, 0.4]
SHAPES = (1, 5, 1023, (3, 5, 7))
_ADAM_ARGS = ("lr", "betas", "eps", "step", "weight_decay", "decoupled")


def _z64(key, tid, numel, offset=0):
    out = torch.empty(numel, dtype=torch.float64)
    return zo_kernels.noise_(out, key, tid, offset)     # float64 output: the reference in float64


def grad64(keys, coeffs, tid, numel, offset=0):
    g = torch.zeros(numel, dtype=torch.float64)
    for k, c in zip(keys, coeffs):
        g += c * _z64(k, tid, numel, offset)
    return g


def adam64(theta, m, v, grads, *, lr, betas, eps, step, weight_decay=0.0, decoupled=False):
    """Adam / AdamW in float64, the textbook form (bias-corrected moments), one step."""
    b1, b2 = betas
    theta, m, v, g = theta.double(), m.double(), v.double(), grads.double()
    if decoupled:
        theta = theta * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * theta
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** step)
    v_hat = v / (1 - b2 ** step)
    return theta - lr * m_hat / (v_hat.sqrt() + eps), m, v


def error_bounds(m0, v0, g, dg, m, v, th, *, lr, betas, eps, step, **_):
    """First-order bounds on |fp32 − float64| of m, v, θ from the noise error dg of g (the spec's z
    tolerance) plus a few fp32 roundings of each operation (2⁻²² relative)."""
    b1, b2 = betas
    r = 2.0 ** -22
    m0, v0 = m0.double(), v0.double()
    dm = (1 - b1) * dg + r * (b1 * m0.abs() + (1 - b1) * g.abs())
    dv = (1 - b2) * 2 * (g.abs() + dg) * dg + r * (b2 * v0 + (1 - b2) * g * g)
    bc2 = math.sqrt(1 - b2 ** step)
    s = lr / (1 - b1 ** step)
    denom = v.sqrt() / bc2 + eps
    dden = dv / (2 * v.sqrt() + 1e-300) / bc2 + r * denom
    ratio = m.abs() / denom
    dth = s * (dm / denom + ratio * dden / denom) + r * (s * ratio + th.abs())
    return dm, dv, dth


def inputs(shape, dtype, seed):
    """θ (of dtype), m and v (float32, v ≥ 0) of one tensor."""
    p = make_tensor(shape, dtype, seed)
    m = make_tensor(shape, torch.float32, seed + 1) * 0.1
    v = make_tensor(shape, torch.float32, seed + 2).abs() * 0.1
    return p, m, v


@dataclass(frozen=True)
class AdamCase:
    """One noise_adam_ call on tensors of SHAPES (tensor i seeded seed·i) with the first k KEYS / COEFFS
    and the keyword arguments kw (tensor_ids / offsets included)."""

    name: str
    kw: dict
    k: int = 3
    seed: int = 10

    def build(self, dtype):
        return [list(x) for x in zip(*(inputs(s, dtype, self.seed * i) for i, s in enumerate(SHAPES)))]


def run_adam(backend, device, tensors, keys, coeffs, **kw):
    """noise_adam_ on `backend` with copies of tensors = [params, exp_avgs, exp_avg_sqs] on `device`;
    asserts that `backend` ran it; the three lists back on the CPU."""
    ts = [[t.to(device, copy=True) for t in x] for x in tensors]
    zo_kernels.noise_adam_(*ts, keys, coeffs, backend=backend, **kw)
    assert zo_kernels.last_backend() == backend
    return [[t.cpu() for t in x] for x in ts]


def check_adam_case(backend, device, case, dtype):
    """One call on `backend` against the reference (not for the reference itself: θ within one grid step,
    16-bit θ's two fp32 values may straddle a rounding boundary; m, v within fp32 rounding of z's difference)
    and, for fp32 θ, against adam64 within error_bounds."""
    keys, coeffs = KEYS[:case.k], COEFFS[:case.k]
    tensors = case.build(dtype)
    got = run_adam(backend, device, tensors, keys, coeffs, **case.kw)
    if backend != "reference":
        ref = run_adam("reference", device, tensors, keys, coeffs, **case.kw)
        for i in range(len(SHAPES)):
            pr, pb = ref[0][i], got[0][i]
            if dtype == torch.float32:
                torch.testing.assert_close(pb, pr, rtol=1e-5, atol=1e-6)
            else:
                assert (ordered(pb) - ordered(pr)).abs().max().item() <= 1
            for s in (1, 2):
                torch.testing.assert_close(got[s][i], ref[s][i], rtol=1e-5, atol=1e-7)
    if dtype != torch.float32:
        return
    kw = {k: case.kw[k] for k in _ADAM_ARGS if k in case.kw}
    for i, (p, m0, v0) in enumerate(zip(*tensors)):
        n = p.numel()
        tid = case.kw.get("tensor_ids", range(len(SHAPES)))[i]
        off = case.kw.get("offsets", [0] * len(SHAPES))[i]
        g = grad64(keys, coeffs, tid, n, off)
        th, m, v = adam64(p.reshape(-1), m0.reshape(-1), v0.reshape(-1), g, **kw)
        g_eff = g if kw.get("decoupled") else g + kw.get("weight_decay", 0.0) * p.reshape(-1).double()
        dg = z_bound(keys, coeffs, tid, n, off)               # the spec's bound on the fp32 z error of g
        dm, dv, dth = error_bounds(m0.reshape(-1), v0.reshape(-1), g_eff, dg, m, v, th, **kw)
        for name, t, want, bound in (("m", got[1][i], m, dm), ("v", got[2][i], v, dv), ("theta", got[0][i], th, dth)):
            err = (t.reshape(-1).double() - want).abs()
            assert (err <= 1.5 * bound + 1e-30).all(), (name, i, (err / bound).max().item())


def check_three_steps(backend, device, dtype):
    """16-bit θ with fp32 m, v over three steps: each step's θ is within one ulp of the float64
    transcription started from the same θ (rounding to nearest), m within fp32 rounding."""
    p, m, v = (t.to(device) for t in inputs(1000, dtype, 3))
    m.zero_(), v.zero_()
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for step in (1, 2, 3):
        keys = [N.step_key(9, step)]
        g = grad64(keys, [0.5], 0, p.numel())
        th, m64, v64 = adam64(p.cpu().reshape(-1), m.cpu(), v.cpu(), g, step=step, **kw)
        zo_kernels.noise_adam_([p], [m], [v], keys, [0.5], step=step, backend=backend, **kw)
        dist = (ordered(p.cpu()) - ordered(th.to(dtype))).abs().max().item()
        assert dist <= 1
        torch.testing.assert_close(m.cpu().double(), m64, rtol=1e-5, atol=1e-6)
