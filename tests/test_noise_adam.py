"""The fused ZO-Adam pass (zo_kernels.noise_adam_) on every backend against a float64 transcription
of Adam (Kingma & Ba, Algorithm 1) with the gradient g = Σ_j c_j z_j, z materialised with noise_."""
import math
import textwrap

import pytest
import torch

import zo_kernels
from zo_kernels import noise as N
from zo_kernels.native import ISAS, cpu_isas, on_isa

from helpers import z_bound
from native_helpers import assert_no_temporaries, make_tensor, ordered

BACKENDS = [b for b in ("reference", "cpu", "triton", "cuda") if b in zo_kernels.available_backends()]


def _on(backend, *tensors):
    """The tensors on the device the backend runs on (Triton: CUDA unless interpreted), as a list."""
    dev = zo_kernels.backends.get(backend).devices[0]
    return [t.to(dev, copy=True) for t in tensors]


def _cpu(ts):
    return [t.cpu() for t in ts]
KEYS = [N.step_key(3, s) for s in range(3)]
COEFFS = [0.7, -1.3, 0.4]
SHAPES = [1, 5, 1023, (3, 5, 7)]


def _z64(key, tid, numel, offset=0):
    out = torch.empty(numel, dtype=torch.float64)
    return zo_kernels.noise_(out, key, tid, offset)     # float64 output: the reference in float64


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


def _inputs(shape, dtype, seed):
    p = make_tensor(shape, dtype, seed)
    m = make_tensor(shape, torch.float32, seed + 1) * 0.1
    v = make_tensor(shape, torch.float32, seed + 2).abs() * 0.1
    return p, m, v


def _grad64(keys, coeffs, tid, numel, offset=0):
    g = torch.zeros(numel, dtype=torch.float64)
    for k, c in zip(keys, coeffs):
        g += c * _z64(k, tid, numel, offset)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_fp32_matches_float64_transcription(backend, decoupled):
    _check_fp32_vs_float64(backend, decoupled)


def _check_fp32_vs_float64(backend, decoupled):
    """fp32 θ, m, v of one call on SHAPES vs adam64 within error_bounds."""
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, step=4, weight_decay=0.05, decoupled=decoupled)
    params, ms, vs = zip(*(_inputs(s, torch.float32, 10 * i) for i, s in enumerate(SHAPES)))
    p1, m1, v1 = (_on(backend, *ts) for ts in (params, ms, vs))
    zo_kernels.noise_adam_(p1, m1, v1, KEYS, COEFFS, backend=backend, **kw)
    assert zo_kernels.last_backend() == backend
    p1, m1, v1 = _cpu(p1), _cpu(m1), _cpu(v1)
    for i, p in enumerate(params):
        n = p.numel()
        g = _grad64(KEYS, COEFFS, i, n)
        th, m, v = adam64(p.reshape(-1), ms[i].reshape(-1), vs[i].reshape(-1), g, **kw)
        g_eff = g if decoupled else g + kw["weight_decay"] * p.reshape(-1).double()
        dg = z_bound(KEYS, COEFFS, i, n)               # the spec's bound on the fp32 z error of g
        dm, dv, dth = error_bounds(ms[i].reshape(-1), vs[i].reshape(-1), g_eff, dg, m, v, th, **kw)
        for name, got, want, bound in (("m", m1[i], m, dm), ("v", v1[i], v, dv), ("theta", p1[i], th, dth)):
            err = (got.reshape(-1).double() - want).abs()
            assert (err <= 1.5 * bound + 1e-30).all(), (name, i, (err / bound).max().item())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_backend_matches_reference(backend, dtype, rounding):
    """Same operations in the same order: θ within one grid step of the reference (16-bit: the two fp32
    values may straddle a rounding boundary), m and v within fp32 rounding of z's difference."""
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, step=2, weight_decay=0.01, rounding=rounding,
              offsets=[0, 6, 0, 4], tensor_ids=[4, 1, 9, 2])
    params, ms, vs = zip(*(_inputs(s, dtype, 7 * i) for i, s in enumerate(SHAPES)))
    runs = {}
    for b in ("reference", backend):
        ts = [_on(b, *x) for x in (params, ms, vs)]
        zo_kernels.noise_adam_(*ts, KEYS[:2], COEFFS[:2], backend=b, **kw)
        runs[b] = [_cpu(x) for x in ts]
    for i in range(len(params)):
        pr, pb = runs["reference"][0][i], runs[backend][0][i]
        if dtype == torch.float32:
            torch.testing.assert_close(pb, pr, rtol=1e-5, atol=1e-6)
        else:
            assert (ordered(pb) - ordered(pr)).abs().max().item() <= 1
        for s in (1, 2):
            torch.testing.assert_close(runs[backend][s][i], runs["reference"][s][i], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_steps_bf16_params_track_float64(backend):
    """bf16 θ with fp32 m, v over three steps: each step's θ is within one bf16 ulp of the float64
    transcription started from the same bf16 θ (rounding to nearest)."""
    _check_three_steps(backend, torch.bfloat16)


def _check_three_steps(backend, dtype):
    p, m, v = _on(backend, *_inputs(1000, dtype, 3))
    m.zero_(), v.zero_()
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for step in (1, 2, 3):
        keys = [N.step_key(9, step)]
        g = _grad64(keys, [0.5], 0, p.numel())
        th, m64, v64 = adam64(p.cpu().reshape(-1), m.cpu(), v.cpu(), g, step=step, **kw)
        zo_kernels.noise_adam_([p], [m], [v], keys, [0.5], step=step, backend=backend, **kw)
        dist = (ordered(p.cpu()) - ordered(th.to(dtype))).abs().max().item()
        assert dist <= 1
        torch.testing.assert_close(m.cpu().double(), m64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_with_offsets_equal_the_whole(backend):
    """z depends on the global index: updating two halves (offsets) equals updating the whole."""
    p, m, v = _on(backend, *_inputs(1001, torch.float32, 5))
    whole = [t.clone() for t in (p, m, v)]
    zo_kernels.noise_adam_([whole[0]], [whole[1]], [whole[2]], KEYS, COEFFS, lr=1e-3, step=7, backend=backend)
    halves = [t.clone() for t in (p, m, v)]
    a = [t[:498] for t in halves]
    b = [t[498:] for t in halves]
    zo_kernels.noise_adam_([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], KEYS, COEFFS, lr=1e-3, step=7,
                           tensor_ids=[0, 0], offsets=[0, 498], backend=backend)
    for w, h in zip(whole, halves):
        assert torch.equal(w, h)


# ------------------------------------------------- the CPU kernel's instruction-set builds (adam_isa.h)
@pytest.fixture(params=ISAS)
def isa(request):
    """The CPU pass on one instruction set (skipped where this CPU lacks it), the default restored after."""
    if "cpu" not in BACKENDS:
        pytest.skip("native CPU backend not built")
    if request.param not in cpu_isas():
        pytest.skip(f"this CPU runs the kernel with {cpu_isas()[-1]} at best")
    with on_isa(request.param):
        yield request.param


ISA_SHAPES = [1, 3, 5, 63, 64, 65, 1023, 4097, (3, 5, 7)]   # tails of every length, several blocks
ISA_OFFSETS = [0, 6, 1, 7, 3, 2**40 + 1, 0, 5, 9]           # starts inside a quad, counter carry


def _isa_workload(dtype, rounding, decoupled):
    """θ, m, v of nine tensors after one pass (three keys, weight decay), then of a 1001-element tensor
    updated as two shards at a cut inside a quad (offsets)."""
    ps, ms, vs = (list(x) for x in zip(*(_inputs(s, dtype, 3 * i) for i, s in enumerate(ISA_SHAPES))))
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, decoupled=decoupled, rounding=rounding,
              rounding_key=77)
    zo_kernels.noise_adam_(ps, ms, vs, KEYS, COEFFS, step=2, offsets=ISA_OFFSETS, tensor_ids=list(range(9)),
                           backend="cpu", **kw)
    whole = _inputs(1001, dtype, 50)
    a, b = [t[:498] for t in whole], [t[498:] for t in whole]
    zo_kernels.noise_adam_([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], KEYS[:2], COEFFS[:2], step=5,
                           tensor_ids=[3, 3], offsets=[0, 498], backend="cpu", **kw)
    return ps + ms + vs + list(whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_instruction_set_gives_the_base_builds_bits(isa, dtype):
    """No FMA contraction, one IEEE operation per step in adam.h's order, the same z and rounding words:
    every instruction-set build writes exactly the baseline build's bits (θ, m and v)."""
    for rounding in ("nearest", "stochastic"):
        for decoupled in (False, True):
            got = _isa_workload(dtype, rounding, decoupled)
            with on_isa("base"):
                want = _isa_workload(dtype, rounding, decoupled)
            for i, (x, y) in enumerate(zip(got, want)):
                assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), (isa, rounding, decoupled, i)


def test_each_instruction_set_matches_float64_transcription(isa):
    for decoupled in (False, True):
        _check_fp32_vs_float64("cpu", decoupled)
    for dtype in (torch.bfloat16, torch.float16):
        _check_three_steps("cpu", dtype)


@pytest.mark.parametrize("bad, match", [
    (dict(exp_avgs="bf16"), "exp_avgs\\[0\\] has dtype"),
    (dict(exp_avg_sqs="short"), "exp_avg_sqs has 1 tensors for 2"),
    (dict(exp_avgs="alias"), "share memory"),
    (dict(step=0), "step must be an int >= 1"),
    (dict(betas=(1.0, 0.9)), "betas\\[0\\]=1.0 is outside"),
    (dict(eps=0.0), "eps=0.0 is outside"),
    (dict(lr=float("nan")), "lr is nan"),
    (dict(coeffs=[1.0, 2.0]), "one coefficient per key"),
    (dict(keys=[], coeffs=[]), "keys is empty"),
    (dict(decoupled=True, weight_decay=2000.0), "must be < 1"),
    (dict(exp_avgs="shape"), "has shape"),
])
def test_bad_input_raises_before_writing(bad, match):
    p = [torch.randn(10), torch.randn(3, 4)]
    m = [torch.zeros(10), torch.zeros(3, 4)]
    v = [torch.ones(10), torch.ones(3, 4)]
    before = [t.clone() for t in p + m + v]
    kw = dict(keys=[1], coeffs=[1.0], lr=1e-3, step=1)
    args = dict(exp_avgs=m, exp_avg_sqs=v)
    for k, val in bad.items():
        if val == "bf16":
            args[k] = [m[0].bfloat16(), m[1]]
        elif val == "short":
            args[k] = [v[0]]
        elif val == "alias":
            args[k] = [p[0], m[1]]
        elif val == "shape":
            args[k] = [m[0], torch.zeros(4, 3)]
        else:
            kw[k] = val
    with pytest.raises((ValueError, TypeError), match=match):
        zo_kernels.noise_adam_(p, args["exp_avgs"], args["exp_avg_sqs"], **kw)
    for b, a in zip(before, p + m + v):
        assert torch.equal(a, b)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="needs the CUDA C++ backend (a GPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_and_cpu_kernels_give_the_same_bits(dtype):
    """csrc/adam.h on host and device, the same z (philox.h), no FMA: identical results."""
    params, ms, vs = zip(*(_inputs(s, dtype, 5 * i) for i, s in enumerate(SHAPES)))
    out = {}
    for b in ("cpu", "cuda"):
        ts = [_on(b, *x) for x in (params, ms, vs)]
        zo_kernels.noise_adam_(*ts, KEYS, COEFFS, lr=1e-3, step=3, weight_decay=0.1, rounding="stochastic", backend=b)
        out[b] = [t.cpu() for x in ts for t in x]
    assert all(torch.equal(a, b) for a, b in zip(out["cpu"], out["cuda"]))


def test_opcheck_schema_and_fake_kernel():
    p, m, v = [torch.randn(10)], [torch.zeros(10)], [torch.ones(10)]
    scal = zo_kernels.adam.AdamScalars.make(1e-3, 0.9, 0.999, 1e-8, 1).as_list()
    args = (p, m, v, [N.to_signed64(KEYS[0])], [0.5], scal, "nearest", [0], [0], 0, "reference")
    torch.library.opcheck(torch.ops.zo_kernels.noise_adam_.default, args, test_utils=("test_schema", "test_faketensor"))


_RSS_SCRIPT = textwrap.dedent("""
    import torch, zo_kernels
    n = 1 << 25
    p, m, v = (torch.empty(n).fill_(0.5) for _ in range(3))   # touch every page
    zo_kernels.noise_adam_([torch.zeros(64)], [torch.zeros(64)], [torch.zeros(64)], [1], [1.0], lr=1e-3, step=1,
                           backend="cpu")                      # warm up (thread pool, code)
    base = hwm()
    zo_kernels.noise_adam_([p], [m], [v], [11, 12], [1e-3, -1e-3], lr=1e-3, step=3, backend="cpu")
    print(hwm() - base, n * 4)
""")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native CPU backend not built")
def test_cpu_pass_allocates_nothing_weight_sized():
    """No z and no gradient tensor: peak RSS grows by < 5% of one tensor during the pass."""
    assert_no_temporaries(_RSS_SCRIPT)
