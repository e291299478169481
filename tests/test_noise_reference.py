"""The PyTorch reference against the spec's known answers and an independent scalar transcription."""
import math

import pytest
import torch

from zo_kernels import noise as N

from helpers import assert_verbose_allclose, spec_vectors

VEC = spec_vectors()


def philox_scalar(c, k):
    """Philox4x32-10 on Python ints, written from the Random123 paper's round function."""
    c0, c1, c2, c3 = c
    k0, k1 = k
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("case", VEC["philox4x32_10"])
def test_philox_random123_known_answers(case):
    out = N.philox4x32_10(*case["counter"], *case["key"])
    assert [int(o) for o in out] == case["out"]


@pytest.mark.parametrize("case", VEC["step_key"])
def test_step_key_vectors(case):
    assert N.step_key(case["base_seed"], case["step"]) == case["key"]


@pytest.mark.parametrize("case", VEC["z"])
def test_normal_vectors(case):
    args = (case["key"], case["tensor_id"], 1)
    kw = dict(offset=case["index"], stream=case["stream"])
    assert abs(N.normal(*args, **kw).item() - case["z"]) <= 1e-6
    assert abs(N.normal(*args, **kw, dtype=torch.float64).item() - case["z"]) <= 1e-12


def test_tensor_philox_matches_scalar_on_random_words():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2**32, (4, 64), generator=g, dtype=torch.int64)
    k = torch.randint(0, 2**32, (2,), generator=g, dtype=torch.int64)
    got = torch.stack(N.philox4x32_10(*c, int(k[0]), int(k[1])))
    for i in range(64):
        want = philox_scalar([int(x) for x in c[:, i]], [int(k[0]), int(k[1])])
        assert tuple(int(x) for x in got[:, i]) == want


def test_normal_matches_scalar_box_muller_over_a_range():
    key, tid = N.step_key(7, 3), 5
    z = N.normal(key, tid, 37, offset=2**32 - 9, dtype=torch.float64)
    for i in range(37):
        idx = 2**32 - 9 + i
        q = idx // 4
        w = philox_scalar([q & 0xFFFFFFFF, q >> 32, tid, 0], [key & 0xFFFFFFFF, key >> 32])
        pairs = [(w[0], w[1]), (w[2], w[3])]
        a, b = pairs[(idx % 4) // 2]
        u1, u2 = ((a >> 9) + 0.5) * 2.0**-23, ((b >> 9) + 0.5) * 2.0**-23
        r = math.sqrt(-2 * math.log(u1))
        want = r * (math.cos if idx % 2 == 0 else math.sin)(2 * math.pi * u2)
        assert abs(z[i].item() - want) < 1e-12


@pytest.mark.parametrize("offset,numel", [(0, 10), (1, 10), (3, 1), (5, 4), (4095, 7)])
def test_slice_at_offset_equals_slice_of_whole(offset, numel):
    key = N.step_key(1, 1)
    whole = N.normal(key, 2, 4200)
    assert torch.equal(N.normal(key, 2, numel, offset=offset), whole[offset:offset + numel])


def test_float32_normals_within_spec_bound_of_float64():
    key = N.step_key(3, 9)
    z32 = N.normal(key, 0, 200_000)
    z64 = N.normal(key, 0, 200_000, dtype=torch.float64)
    assert_verbose_allclose(z32, z64, atol=1e-5, rtol=1e-5, what="fp32 vs fp64 normals")


def test_uniform_is_open_interval_and_exact():
    words = torch.tensor([0, 511, 512, 2**32 - 1], dtype=torch.int64)
    u = N.uniform(words)
    assert (u > 0).all() and (u < 1).all()
    assert torch.equal(u.double(), N.uniform(words, torch.float64))


def test_step_key_rejects_out_of_range():
    with pytest.raises(ValueError, match="64-bit"):
        N.step_key(2**64, 0)
    with pytest.raises(ValueError, match="step"):
        N.step_key(0, -1)
    with pytest.raises(TypeError):
        N.step_key(1.5, 0)


# ----------------------------------------------------------------- Rademacher form (docs/spec.md §9)
@pytest.mark.parametrize("case", VEC["sign"])
def test_sign_vectors(case):
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        s = N.rademacher(case["key"], case["tensor_id"], 1, offset=case["index"], stream=case["stream"], dtype=dtype)
        assert s.item() == case["z"], (case, dtype)


def test_sign_block_vector():
    v = VEC["sign_block"]
    s = N.rademacher(v["key"], v["tensor_id"], len(v["z"]), offset=v["first"])
    assert s.tolist() == v["z"]


def sign_scalar(key, tid, i, stream=5):
    """s of element i from the spec's words, on Python ints: bit i % 32 of word (i % 128) // 32 of block i // 128."""
    b = i // 128
    w = philox_scalar([b & 0xFFFFFFFF, b >> 32, tid, stream], [key & 0xFFFFFFFF, key >> 32])[(i % 128) // 32]
    return -1.0 if (w >> (i % 32)) & 1 else 1.0


@pytest.mark.parametrize("offset,numel", [(0, 300), (5, 251), (127, 2), (2**32 - 130, 263), (2**40 + 3, 129)])
def test_rademacher_matches_scalar_transcription_across_blocks(offset, numel):
    key, tid = N.step_key(9, 4), 7
    s = N.rademacher(key, tid, numel, offset=offset)
    assert s.tolist() == [sign_scalar(key, tid, offset + i) for i in range(numel)]


def test_rademacher_slices_and_noise_values():
    key = N.step_key(3, 1)
    whole = N.rademacher(key, 2, 1000)
    for a, b in ((0, 1), (1, 129), (127, 385), (999, 1000)):
        assert torch.equal(N.rademacher(key, 2, b - a, offset=a), whole[a:b])
    assert torch.equal(N.noise_values("rademacher", key, 2, 1000), whole)
    assert torch.equal(N.noise_values("gaussian", key, 2, 1000), N.normal(key, 2, 1000))
    assert N.default_stream("rademacher") == N.STREAM_SIGN == 5 and N.default_stream("gaussian") == 0
    # a fair coin: 1000 signs have mean within 4 sigma of 0
    assert abs(whole.mean().item()) < 4 / 1000 ** 0.5
