"""What is specific to the fused ZO-Adam pass (zo_kernels.noise_adam_) beyond the backend contract: the C++
CPU kernel's instruction-set builds, bit-identity of the CPU and CUDA kernels, input checks and no
temporaries.  Every backend against the reference and the float64 transcription of Adam
(tests/adam_helpers.py): test_backend_conformance.py (ADAM_CASES)."""
import textwrap

import pytest
import torch

import zo_kernels
from zo_kernels.native import ISAS, cpu_isas, on_isa

from adam_helpers import COEFFS, KEYS, SHAPES, check_adam_case, check_three_steps, inputs, run_adam
from backends_helpers import skip_unless, why_not
from native_helpers import assert_no_temporaries
from test_backend_conformance import ADAM_CASES


# ------------------------------------------------- the CPU kernel's instruction-set builds (adam_isa.h)
@pytest.fixture(params=ISAS)
def isa(request):
    """The CPU pass on one instruction set (skipped where this CPU lacks it), the default restored after."""
    if why := why_not("cpu", "cpu", "adam"):
        pytest.skip(why)
    if request.param not in cpu_isas():
        pytest.skip(f"this CPU runs the kernel with {cpu_isas()[-1]} at best")
    with on_isa(request.param):
        yield request.param


ISA_SHAPES = [1, 3, 5, 63, 64, 65, 1023, 4097, (3, 5, 7)]   # tails of every length, several blocks
ISA_OFFSETS = [0, 6, 1, 7, 3, 2**40 + 1, 0, 5, 9]           # starts inside a quad, counter carry


def _isa_workload(dtype, rounding, decoupled):
    """θ, m, v of nine tensors after one pass (three keys, weight decay), then of a 1001-element tensor
    updated as two shards at a cut inside a quad (offsets)."""
    ps, ms, vs = (list(x) for x in zip(*(inputs(s, dtype, 3 * i) for i, s in enumerate(ISA_SHAPES))))
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, decoupled=decoupled, rounding=rounding,
              rounding_key=77)
    zo_kernels.noise_adam_(ps, ms, vs, KEYS, COEFFS, step=2, offsets=ISA_OFFSETS, tensor_ids=list(range(9)),
                           backend="cpu", **kw)
    whole = inputs(1001, dtype, 50)
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


def test_each_instruction_set_matches_reference_and_float64(isa):
    for case in ADAM_CASES:
        check_adam_case("cpu", "cpu", case, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        check_three_steps("cpu", "cpu", dtype)


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


@skip_unless("cuda", "cuda", "adam")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_and_cpu_kernels_give_the_same_bits(dtype):
    """csrc/adam.h on host and device, the same z (philox.h), no FMA: identical results."""
    tensors = [list(x) for x in zip(*(inputs(s, dtype, 5 * i) for i, s in enumerate(SHAPES)))]
    kw = dict(lr=1e-3, step=3, weight_decay=0.1, rounding="stochastic")
    out = {b: [t for x in run_adam(b, b, tensors, KEYS, COEFFS, **kw) for t in x] for b in ("cpu", "cuda")}
    assert all(torch.equal(a, b) for a, b in zip(out["cpu"], out["cuda"]))


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


@skip_unless("cpu", "cpu", "adam")
def test_cpu_pass_allocates_nothing_weight_sized():
    """No z and no gradient tensor: peak RSS grows by < 5% of one tensor during the pass."""
    assert_no_temporaries(_RSS_SCRIPT)
