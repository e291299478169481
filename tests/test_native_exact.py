"""The native exact-restore form (zo_kernels::_noise_axpy_exact_native, csrc/restore.h) on CPU.

Two oracles:
  * the reference (zo_kernels.restore) as it is: its fp32 z differs from the native z by ~1e-7
    relative, so sums can land on the other side of a rounding boundary now and then;
  * the reference fed with the native z (restore.normal patched): then every integer rule (ordered
    ints, candidates, ties, residue packing) and every rounding must give the same bits.
"""
import textwrap

import pytest
import torch

import zo_kernels
from zo_kernels import backends, native
from zo_kernels import noise as N
from zo_kernels import restore as R
from zo_kernels.native import cpu_isas, on_isa

from helpers import z_bound
from native_helpers import assert_no_temporaries

_REASON = zo_kernels.backend_status().get("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF = [torch.bfloat16, torch.float16]
MU = 1e-3
KEYS = [N.step_key(7, s) for s in range(3)]


@pytest.fixture(autouse=True)
def _needs_extension():
    if "cpu" not in zo_kernels.available_backends():
        pytest.fail(f"the native CPU backend is unavailable: {_REASON}")


def _bits(x):
    return x.contiguous().view({torch.float32: torch.int32}.get(x.dtype, torch.int16))


def _same(a, b):
    """Bit-identical, except that any NaN equals any NaN (torch's vectorised float -> bf16 cast gives
    NaN the pattern 0xFFFF, the kernels give 0x7FC0; the payload carries no meaning here)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(_bits(a)[~nan_a], _bits(b)[~nan_b])


def _weights(n, dtype, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


def _hard_weights(n, dtype, seed):
    """Magnitudes over many binades (perturbations cross binade edges: multi-point preimages), plus
    zeros of both signs, the largest finite values, subnormals, infinities and NaN."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(n, generator=g) * 14 - 16)  # 2^-16 .. 2^-2
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = (mag * sign).to(dtype)
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.tiny / 4,
                            float("inf"), float("-inf"), float("nan")]).to(dtype)
    m = min(n, special.numel())
    x[:m] = special[:m]
    return x


def _native_noise(noise, key, tensor_id, numel, offset=0, device=None, **_):
    return zo_kernels.noise_(torch.empty(numel), key, tensor_id, offset, backend="cpu", noise=noise)


@pytest.fixture
def reference_with_native_z(monkeypatch):
    """The reference's exact form computing with the native kernel's z (restore.py draws through noise_values)."""
    monkeypatch.setattr(R, "noise_values", _native_noise)
    return "reference"


def _three_passes(theta, backend, bits, keys=KEYS[:1], tensor_ids=None, offsets=None, rounding="nearest"):
    """+mu (plane written), -mu (undo mu, plane read), update (undo -mu, gamma != 1)."""
    params = [t.clone() for t in theta]
    planes = R.make_planes(params, bits, offsets=offsets) if bits else None
    kw = dict(tensor_ids=tensor_ids, offsets=offsets, backend=backend)
    k = len(keys)
    out = {}
    zo_kernels.noise_axpy_(params, keys, [MU] * k, undo=None if planes else [0.0] * k, planes=planes, **kw)
    out["plus"] = [p.clone() for p in params]
    out["plane"] = [pl.clone() for pl in planes] if planes else []
    zo_kernels.noise_axpy_(params, keys, [-MU] * k, undo=[MU] * k, planes=planes, **kw)
    out["minus"] = [p.clone() for p in params]
    zo_kernels.noise_axpy_(params, keys, [-0.5 * MU] * k, undo=[-MU] * k, gamma=0.999, planes=planes,
                           rounding=rounding, rounding_key=99, **kw)
    out["update"] = params
    assert zo_kernels.last_backend() == backend
    return out


# ------------------------------------------------------------------------------ registration
def test_registered_as_the_cpu_backends_exact_form():
    b = backends.get("cpu")
    assert b.axpy_exact is native.noise_axpy_exact
    assert "axpy_exact" not in b.notes  # no hidden reference fallback
    p = [torch.zeros(8, dtype=torch.bfloat16)]
    zo_kernels.noise_axpy_(p, [1], [MU], undo=[0.0])  # the default CPU backend serves the exact form
    assert zo_kernels.last_backend() == "cpu"


# ---------------------------------------------------------------- the reference with native z
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [0, 2, 4, 8])
def test_bit_identical_to_the_reference_rules_given_the_same_z(dtype, bits, reference_with_native_z):
    theta = [_hard_weights(4099, dtype, 1), _weights(517, dtype, 2)]
    kw = dict(keys=KEYS[:2], tensor_ids=[3, 8], offsets=[5, 2])
    for rounding in ("nearest", "stochastic"):
        got = _three_passes(theta, "cpu", bits, rounding=rounding, **kw)
        want = _three_passes(theta, reference_with_native_z, bits, rounding=rounding, **kw)
        for stage in ("plus", "plane", "minus", "update"):
            for g, w in zip(got[stage], want[stage]):
                if stage == "plane":
                    assert torch.equal(g, w)
                else:
                    assert _same(g, w), (stage, rounding)


@pytest.mark.parametrize("dtype", HALF)
def test_ambiguous_elements_resolve_like_the_reference(dtype, reference_with_native_z):
    """Tiny weights over many binades: multi-point preimages are common, resolved (or not) alike."""
    theta = [(_hard_weights(8192, dtype, 4).float() * 1e-2).to(dtype)]
    key = KEYS[2]
    s = MU * _native_noise("gaussian", key, 0, 8192)
    for bits in (0, 2):
        got = _three_passes(theta, "cpu", bits, keys=[key])
        want = _three_passes(theta, reference_with_native_z, bits, keys=[key])
        for stage in ("plus", "minus", "update"):
            assert _same(got[stage][0], want[stage][0]), (bits, stage)
        res = R.to_ordered(theta[0]) & ((1 << bits) - 1) if bits else None
        ambiguous = R.invert(got["plus"][0], s, res, bits)[1].double().mean().item()
        assert ambiguous > (0.02 if bits == 0 else 1e-3), ambiguous  # the case is really exercised


def test_no_keys_matches_the_reference_bit_for_bit():
    """Without keys no z enters: plane bytes and values (special values included) equal the reference."""
    for dtype in DTYPES:
        theta = [_hard_weights(1031, dtype, 5), _hard_weights(6, dtype, 6)]
        out = {}
        for be in ("cpu", "reference"):
            params = [t.clone() for t in theta]
            planes = R.make_planes(params, 8, offsets=[0, 3])
            zo_kernels.noise_axpy_(params, [], [], gamma=0.75, planes=planes, offsets=[0, 3], backend=be)
            out[be] = params + planes
        for a, b in zip(out["cpu"], out["reference"]):
            assert _same(a, b) if a.is_floating_point() else torch.equal(a, b)


# --------------------------------------------------------------------- the reference as it is
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_reference_up_to_z_roundoff(dtype, bits):
    theta = [_weights(20011, dtype, 7)]
    got = _three_passes(theta, "cpu", bits)
    want = _three_passes(theta, "reference", bits)
    assert torch.equal(got["plane"][0], want["plane"][0])  # written from theta itself: exact
    for stage in ("plus", "minus", "update"):
        g, w = got[stage][0], want[stage][0]
        if dtype == torch.float32:
            # fp32 sums follow z's round-off: within the spec's z bound times the coefficients.
            bound = z_bound(KEYS[:1], [1.0], 0, g.numel()) * 3 * MU + 4 * 2.0**-24 * 0.1
            assert bool(((g.double() - w.double()).abs() <= bound).all()), stage
        else:
            # Equal except where fp32 z round-off moves a sum across a rounding boundary.
            assert (g != w).double().mean().item() < 5e-3, stage


# ------------------------------------------------------------------------ perturb / restore
def _cycles(p, planes, cycles, naive=False):
    for c in range(cycles):
        k = N.step_key(11, c)
        if naive:  # the three ordinary passes
            for a in (MU, -2 * MU, MU):
                zo_kernels.noise_axpy_([p], [k], [a], backend="cpu")
        else:
            zo_kernels.noise_axpy_([p], [k], [MU], undo=[0.0] if planes is None else None, planes=planes,
                                   backend="cpu")
            zo_kernels.noise_axpy_([p], [k], [-MU], undo=[MU], planes=planes, backend="cpu")
            zo_kernels.noise_axpy_([p], [k], [0.0], undo=[-MU], planes=planes, backend="cpu")
    return p


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", HALF)
def test_cycles_at_lr0_come_back_bit_exact(dtype):
    theta0 = _weights(1 << 16, dtype, 8)
    naive = _rel(_cycles(theta0.clone(), None, 40, naive=True), theta0)
    p = theta0.clone()
    planed = _rel(_cycles(p, R.make_planes([p], 8), 40), theta0)
    exact = (_bits(p) == _bits(theta0)).double().mean().item()
    assert exact >= 0.999, exact
    assert naive > 0 and planed * 100 <= naive, (planed, naive)
    # Without a plane the inverse alone already beats the naive way.
    assert _rel(_cycles(theta0.clone(), None, 40), theta0) < naive / 4


# ------------------------------------------------------------------- threads, ISAs, shards
def _workload():
    sizes = [(1 << 20) + 3, 4097, 5, 70001]
    theta = [_weights(n, DTYPES[i % 3], 20 + i) for i, n in enumerate(sizes)]
    return theta, dict(keys=KEYS[:2], tensor_ids=[0, 5, 2, 9], offsets=[1, 0, 6, 4 * 2**33 + 3],
                       rounding="stochastic")


def _run_workload():
    theta, kw = _workload()
    out = []
    for bits in (0, 4):
        res = _three_passes(theta, "cpu", bits, **kw)
        out += res["plane"] + res["minus"] + res["update"]
    return out


def test_identical_with_1_and_2_threads():
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_run_workload())
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_every_instruction_set_gives_the_same_bits():
    isas = cpu_isas()
    results = {}
    for isa in isas:
        with on_isa(isa):
            results[isa] = _run_workload()
    for isa in isas[1:]:
        for a, b in zip(results[isas[0]], results[isa]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), isa


@pytest.mark.parametrize("dtype", DTYPES)
def test_shards_at_offsets_equal_the_whole(dtype):
    """A tensor split at any cuts (not only at quads), each shard with its own plane, equals the whole."""
    whole = _weights(6001, dtype, 9)
    cuts = [0, 3, 6, 7, 64, 1001, 4096, 4097, 6001]
    shards = [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    offsets = cuts[:-1]
    kw = dict(keys=KEYS[:2], rounding="stochastic")
    one = _three_passes([whole], "cpu", 4, tensor_ids=[6], **kw)
    parts = _three_passes(shards, "cpu", 4, tensor_ids=[6] * len(shards), offsets=offsets, **kw)
    for stage in ("plus", "minus", "update"):
        assert torch.equal(_bits(torch.cat(parts[stage])), _bits(one[stage][0])), stage
    res = torch.cat([R.unpack_residues(pl, b - a, a, 4) for pl, a, b in zip(parts["plane"], cuts, cuts[1:])])
    assert torch.equal(res, R.unpack_residues(one["plane"][0], 6001, 0, 4))


def test_mixed_dtypes_and_empty_tensors_in_one_call():
    theta = [_weights(33, torch.float32, 1), torch.empty(0, dtype=torch.bfloat16), _weights(9, torch.float16, 2)]
    got = _three_passes(theta, "cpu", 8)
    for a, b in zip(got["update"], _three_passes(theta, "reference", 8)["update"]):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert got["plane"][1].numel() == 0


# --------------------------------------------------------------------------------- bad input
def test_internal_op_checks_its_arguments():
    ops = torch.ops.zo_kernels
    p = torch.zeros(8, dtype=torch.bfloat16)
    pl = torch.zeros(2, dtype=torch.uint8)
    ok = dict(tensor_ids=[0], offsets=[0])
    call = ops._noise_axpy_exact_native
    with pytest.raises(RuntimeError, match="undo"):
        call([p], [1], [1.0], [], 1.0, [pl], 2, 0, ok["tensor_ids"], ok["offsets"], 0, 0, [])
    with pytest.raises(RuntimeError, match="plane_bits"):
        call([p], [1], [1.0], [0.0], 1.0, [pl], 3, 0, [0], [0], 0, 0, [])
    with pytest.raises(RuntimeError, match="needs 4"):
        call([p], [1], [1.0], [0.0], 1.0, [pl], 4, 0, [0], [0], 0, 0, [])
    with pytest.raises(RuntimeError, match="uint8"):
        call([p], [1], [1.0], [0.0], 1.0, [torch.zeros(2, dtype=torch.int16)], 2, 0, [0], [0], 0, 0, [])
    with pytest.raises(RuntimeError, match="planes for"):
        call([p], [1], [1.0], [0.0], 1.0, [pl, pl], 2, 0, [0], [0], 0, 0, [])
    with pytest.raises(RuntimeError, match="dtype"):
        call([p.double()], [1], [1.0], [0.0], 1.0, [], 2, 0, [0], [0], 0, 0, [])
    assert torch.equal(p, torch.zeros(8, dtype=torch.bfloat16)) and torch.equal(pl, torch.zeros(2, dtype=torch.uint8))


# ----------------------------------------------------------------------------- no temporaries
# hwm() (peak RSS) is defined by native_helpers.assert_no_temporaries
_RSS_SCRIPT = textwrap.dedent("""
    import torch, zo_kernels
    from zo_kernels import restore as R
    n = 1 << 26
    p = torch.empty(n, dtype=torch.bfloat16).fill_(0.02)   # touch every page
    planes = R.make_planes([p], 8)
    planes[0].fill_(1)
    w = [torch.zeros(64, dtype=torch.bfloat16)]
    zo_kernels.noise_axpy_(w, [1], [1.0], planes=R.make_planes(w, 8), backend="cpu")  # warm up
    base = hwm()
    zo_kernels.noise_axpy_([p], [11, 12], [1e-3, -1e-3], planes=planes, backend="cpu")
    zo_kernels.noise_axpy_([p], [11, 12], [-1e-3, 1e-3], undo=[1e-3, -1e-3], planes=planes, backend="cpu")
    zo_kernels.noise_axpy_([p], [11], [5e-4], undo=[-1e-3], gamma=0.999, rounding="stochastic", backend="cpu")
    print(hwm() - base, n * 2)
""")


def test_no_temporaries_proportional_to_the_tensor():
    assert_no_temporaries(_RSS_SCRIPT)
