"""What is specific to the C++ CPU kernel (backend "cpu", zo_kernels._C): its internal ops, the
instruction sets, thread counts, its precision claim and no temporaries.  The backend contract it
shares with the others is tests/test_backend_conformance.py."""
import math
import textwrap

import pytest
import torch

import zo_kernels
from zo_kernels import native
from zo_kernels import noise as N
from zo_kernels.native import ISAS, cpu_isas, on_isa

from helpers import spec_vectors
from native_helpers import assert_no_temporaries, make_tensor, rademacher_workload, run

# The extension is built by scripts/setup_env.sh (pip install -e .): its absence is a failure here.
_REASON = zo_kernels.backend_status().get("cpu")


@pytest.fixture(autouse=True)
def _needs_extension():
    if "cpu" not in zo_kernels.available_backends():
        pytest.fail(f"the native CPU backend is unavailable: {_REASON}")


OPS = torch.ops.zo_kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KEYS = [N.step_key(5, s) for s in range(4)]
ALPHAS = [1e-3, -2e-3, 0.5, -0.75]


@pytest.fixture
def isa_restore():
    with on_isa(native.cpu_isa()):
        yield


# ------------------------------------------------------------------------------- the integer layer
def test_philox_known_answers():
    for v in spec_vectors()["philox4x32_10"]:
        assert OPS._philox4x32_native(v["counter"], v["key"]) == v["out"]


def _words(key, tid, n, offset, stream):
    out = torch.empty(n, dtype=torch.int32)
    OPS._noise_native(out, N.to_signed64(key), tid, offset, stream, 0)
    return out.to(torch.int64) & N.M32


@pytest.mark.parametrize("offset", [0, 1, 6, 4 * (2**32 - 5) + 2, 2**61 + 3])
def test_words_bit_exact_every_isa(offset, isa_restore):
    """The vectorised Philox (16 quads per block, carry into the counter's high word) vs the reference."""
    key = KEYS[1]
    for isa in cpu_isas():
        native.cpu_isa(isa)
        for tid, stream, n in ((0, 0, 1), (3, 2, 5), (2**32 - 1, 2**32 - 1, 1023), (7, 0, 4097)):
            assert torch.equal(_words(key, tid, n, offset, stream),
                               N.random_words(key, tid, n, offset=offset, stream=stream)), (isa, tid, n)


# ---------------------------------------------------------------------------------------- noise_
@pytest.mark.parametrize("offset", [0, 3, 2**40 + 1])
def test_noise_close_to_float64(offset):
    n, key = 1 << 18, KEYS[2]
    z = zo_kernels.noise_(torch.empty(n), key, 4, offset, backend="cpu")
    z64 = N.normal(key, 4, n, offset=offset, dtype=torch.float64)
    err = ((z.double() - z64).abs() / z64.abs().clamp_min(1.0)).max().item()
    assert err <= 1e-6  # spec: 1e-5; the reference's own float32 error is ~2e-6
    zr = zo_kernels.noise_(torch.empty(n), key, 4, offset, backend="reference")
    assert ((z.double() - zr.double()).abs() <= 1e-5 * z64.abs().clamp_min(1.0)).all()


# ------------------------------------------------------------------------------------ noise_axpy_
# ----------------------------------------------------------------------------------- rounding
@pytest.mark.parametrize("dtype,value", [(torch.bfloat16, 1.0), (torch.bfloat16, -3.0),
                                         (torch.float16, 1.0), (torch.float16, -2.0 ** -20)])
def test_stochastic_rounding_unbiased(dtype, value):
    """x + 0.3 ulp rounds up with probability 0.3: the mean over 2^16 elements is x + 0.3 ulp."""
    n = 1 << 16
    x = torch.full((n,), value, dtype=dtype)
    mag, sign = abs(value), (1 if value > 0 else -1)
    if dtype == torch.float16 and mag < 2.0 ** -14:
        spacing = 2.0 ** -24  # fp16 subnormals
    else:
        spacing = 2.0 ** (math.floor(math.log2(mag)) - (7 if dtype == torch.bfloat16 else 10))
    delta = 0.3 * spacing * sign  # away from zero: stays in x's binade
    dense = [torch.full((n,), delta, dtype=torch.float32)]
    p = [x.clone()]
    zo_kernels.noise_axpy_(p, [KEYS[0]], [0.0], dense=dense, beta=1.0, rounding="stochastic",
                           rounding_key=N.step_key(8, 1), backend="cpu")
    got = p[0].double()
    assert set(got.unique().tolist()) <= {value, value + spacing * sign}
    frac = ((got - value).abs() / spacing).mean().item()
    sigma = (0.3 * 0.7 / n) ** 0.5
    assert abs(frac - 0.3) < 5 * sigma, frac
    # nearest leaves x where it is
    q = [x.clone()]
    zo_kernels.noise_axpy_(q, [KEYS[0]], [0.0], dense=dense, beta=1.0, backend="cpu")
    assert torch.equal(q[0], x)


# ------------------------------------------------------------------------ reproducibility
def _workload():
    sizes = [1 << 20, 4097, 3, (64, 333)]
    params = [make_tensor(s, DTYPES[i % 3], i) for i, s in enumerate(sizes)]
    dense = [make_tensor(s, torch.float32, 20 + i) for i, s in enumerate(sizes)]
    kw = dict(keys=KEYS[:2], alphas=ALPHAS[:2], gamma=0.999, dense=dense, beta=1e-3, rounding="stochastic",
              rounding_key=123, offsets=[0, 2, 5, 1])
    return params, kw


def test_bit_identical_with_1_and_2_threads():
    params, kw = _workload()
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(run("cpu", params, **kw))
            z = zo_kernels.noise_(torch.empty(1 << 20), KEYS[0], 1, 3, backend="cpu")
            outs[-1].append(z)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_every_instruction_set_gives_the_same_bits(isa_restore):
    params, kw = _workload()
    sub = [torch.tensor([3e-6, -1e-7, 6.0e-5, 65500.0, -7e4, 1e-9], dtype=torch.float16)]  # subnormals, overflow
    results = {}
    for isa in cpu_isas():
        native.cpu_isa(isa)
        results[isa] = run("cpu", params, **kw) + run("cpu", sub, keys=[KEYS[0]], alphas=[1e-6],
                                                         rounding="stochastic", rounding_key=5)
    first = results[cpu_isas()[0]]
    for isa, res in results.items():
        for a, b in zip(first, res):
            assert torch.equal(a, b), isa


def test_rademacher_bit_identical_across_instruction_sets_and_threads(isa_restore):
    before = torch.get_num_threads()
    results = {}
    try:
        for isa in cpu_isas():
            native.cpu_isa(isa)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results[isa, threads] = rademacher_workload("cpu")
    finally:
        torch.set_num_threads(before)
    first = results["base", 1]
    for key, res in results.items():
        for i, (a, b) in enumerate(zip(first, res)):
            assert torch.equal(a, b), (key, i)


def test_rademacher_many_keys_same_bits_as_reference():
    """More keys than sign-block slots (keys share a slot; each checks its key), every dtype."""
    keys = [N.step_key(6, s) for s in range(19)]
    alphas = [0.01 * (j + 1) * (-1) ** j for j in range(19)]
    params = [make_tensor(s, DTYPES[i % 3], i) for i, s in enumerate((1000, 517, 4097))]
    kw = dict(keys=keys, alphas=alphas, gamma=0.9, offsets=[0, 61, 2**33 + 127], noise="rademacher")
    for a, b in zip(run("cpu", params, **kw), run("reference", params, **kw)):
        assert torch.equal(a, b)


def _lowrank_workload():
    """Low-rank calls touching every path of the pass: ranks 1 .. 16, every dtype, stochastic rounding, the
    U-space dense term, dim-0 shards, and the exact form (residues written, then read while inverting)."""
    from zo_kernels import restore as R

    shapes = [(5, 7), (37, 13), (3, 2, 4), (1, 3), (64, 33), (130, 257)]
    offsets = [7 * 3, 13 * 101, 0, 3 * 5, 33, 257 * 9]
    out = []
    for rank, rounding, dtype in ((1, "nearest", torch.float32), (3, "stochastic", torch.bfloat16),
                                  (16, "stochastic", torch.float16), (5, "nearest", torch.bfloat16)):
        ps = [make_tensor(s, dtype, i) for i, s in enumerate(shapes)]
        dense = [make_tensor((s[0], rank), torch.float32, 40 + i) for i, s in enumerate(shapes)]
        zo_kernels.lowrank_noise_axpy_(ps, KEYS[:3], KEYS[3], ALPHAS[:3], rank=rank, gamma=0.99, dense=dense,
                                       beta=0.3, rounding=rounding, offsets=offsets, rounding_key=11, backend="cpu")
        out += ps
    for bits in (2, 8):
        ps = [(make_tensor(s, torch.float32, i) * 0.02).to(torch.bfloat16) for i, s in enumerate(shapes)]
        planes = R.make_planes(ps, bits, offsets=offsets)
        kw = dict(rank=4, offsets=offsets, planes=planes, backend="cpu")
        zo_kernels.lowrank_noise_axpy_(ps, [KEYS[0]], KEYS[3], [1e-3], undo=[0.0], **kw)
        zo_kernels.lowrank_noise_axpy_(ps, KEYS[:2], KEYS[3], [-1e-3, 2e-3], undo=[1e-3, 0.0], gamma=0.999, **kw)
        out += ps + planes
    return out


def test_lowrank_every_instruction_set_gives_the_same_bits(isa_restore):
    results = {}
    for isa in cpu_isas():
        native.cpu_isa(isa)
        results[isa] = _lowrank_workload()
    first = results["base"]
    for isa, res in results.items():
        for i, (a, b) in enumerate(zip(first, res)):
            assert torch.equal(a, b), (isa, i)


def test_is_the_default_cpu_backend():
    p = [torch.zeros(10)]
    zo_kernels.noise_axpy_(p, [KEYS[0]], [1.0])
    assert zo_kernels.last_backend() == "cpu"
    assert native.cpu_isa() in ISAS


# ------------------------------------------------------------------------------ bad input
def test_internal_op_checks_its_arguments():
    p = torch.zeros(8)
    with pytest.raises(RuntimeError, match="tensor_ids"):
        OPS._noise_axpy_native([p], [1], [1.0], 1.0, [], 0.0, 0, [], [], 0, 0, [])
    with pytest.raises(RuntimeError, match="dtype"):
        OPS._noise_axpy_native([p.double()], [1], [1.0], 1.0, [], 0.0, 0, [0], [0], 0, 0, [])
    with pytest.raises(RuntimeError, match="elements"):
        OPS._noise_axpy_native([p], [1], [1.0], 1.0, [torch.zeros(3)], 0.0, 0, [0], [0], 0, 0, [])
    with pytest.raises(RuntimeError, match="offsets"):
        OPS._noise_axpy_native([p], [1], [1.0], 1.0, [], 0.0, 0, [0], [-1], 0, 0, [])
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS._noise_native(torch.zeros(4, 4).t(), 1, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"noise must be 0 \(gaussian\) or 1 \(rademacher\), got 2"):
        OPS._noise_axpy_native([p], [1], [1.0], 1.0, [], 0.0, 0, [0], [0], 0, 2, [])
    with pytest.raises(RuntimeError, match="noise must be"):
        OPS._noise_native(p, 1, 0, 0, 0, -1)
    with pytest.raises(RuntimeError, match="noise must be"):
        OPS._noise_adam_native([p], [p.clone()], [p.clone()], [1], [1.0], [0.9, 0.99, 1e-8, 1.0, 1.0, 0.0, 1.0], 0,
                               [0], [0], 0, 7)
    assert not p.any()
    with pytest.raises(RuntimeError, match="not available|unknown"):
        native.cpu_isa("avx1024")


# --------------------------------------------------------------------------- no temporaries
# hwm() (peak RSS) is defined by native_helpers.assert_no_temporaries
_RSS_SCRIPT = textwrap.dedent("""
    import torch, zo_kernels
    n = 1 << 27
    p = torch.empty(n).fill_(0.5)           # touch every page
    zo_kernels.noise_axpy_([torch.zeros(64)], [1], [1.0], backend="cpu")  # warm up (thread pool, code)
    base = hwm()
    zo_kernels.noise_axpy_([p], [11, 12], [1e-3, -1e-3], gamma=0.999, backend="cpu")
    zo_kernels.noise_(p, 13, 1, backend="cpu")
    print(hwm() - base, n * 4)
""")


def test_no_temporaries_proportional_to_the_tensor():
    assert_no_temporaries(_RSS_SCRIPT)
