"""Seeded fuzz of noise_axpy_: a few hundred calls, valid and malformed (overlapping views, a dense term
overlapping a parameter, inference / sparse / non-contiguous / integer tensors, non-numeric or
out-of-range coefficients, fractional ids, float64 in the exact form, planes overlapping params, ...).

Each call either succeeds and matches a float64 transcription of the primitive on the reference's
z, or raises with every tensor it was given bit-identical.  A malformed call must raise; a valid one
must succeed.
"""
import math
import random

import pytest
import torch

import zo_kernels
from zo_kernels.noise import normal, step_key

N_CALLS = 300
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Case:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.storages = []      # every tensor whose bytes must survive a refused call
        self.kw = {}
        self.bad = None         # name of the fault, None for a valid call

    def tensor(self, n, dtype, base=None):
        g = torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        t = (torch.randn(n, generator=g) * 0.1).to(dtype)
        self.storages.append(t)
        return t


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    return torch.finfo(dtype).eps * x.abs().clamp_min(torch.finfo(dtype).tiny)


def make_case(rng: random.Random) -> Case:
    c = Case(rng)
    dtype = rng.choice(DTYPES)
    n_params = rng.randint(1, 3)
    sizes = [rng.randint(0, 24) for _ in range(n_params)]
    if rng.random() < 0.3:          # disjoint views of one buffer: valid
        base = c.tensor(sum(sizes) + 3, dtype)
        params, at = [], 1
        for s in sizes:
            params.append(base[at:at + s])
            at += s
    else:
        params = [c.tensor(s, dtype) for s in sizes]
    n_keys = rng.randint(1, 3)
    keys = [step_key(rng.randrange(100), rng.randrange(100)) for _ in range(n_keys)]
    alphas = [rng.uniform(-1, 1) for _ in range(n_keys)]
    kw = {"gamma": rng.choice([1.0, 0.75]), "backend": rng.choice([None, "reference"])}
    if rng.random() < 0.3:
        kw["dense"] = [c.tensor(p.numel(), dtype).view_as(p) for p in params]
        kw["beta"] = rng.uniform(-1, 1)
        if rng.random() < 0.3:
            kw["dense"][0] = params[0]      # a param as its own dense term: valid
    if rng.random() < 0.3:
        kw["tensor_ids"] = [rng.randrange(1 << 32) for _ in params]
    if rng.random() < 0.3:
        kw["offsets"] = [rng.randrange(1 << 40) for _ in params]
    c.params, c.keys, c.alphas, c.kw = params, keys, alphas, kw

    faults = [f for f in FAULTS if f[1](c)]
    if rng.random() < 0.75 and faults:
        name, _, apply = rng.choice(faults)
        apply(c)
        c.bad = name
    return c


def _big(c):
    return max(p.numel() for p in c.params) >= 4


def _first_big(c):
    return next(i for i, p in enumerate(c.params) if p.numel() >= 4)


def _overlap_views(c):
    base = c.tensor(30, c.params[0].dtype)
    c.params = [base[0:12], base[6:18]] + c.params[1:]
    c.kw.pop("dense", None)
    c.kw.pop("tensor_ids", None)
    c.kw.pop("offsets", None)


def _contained_view(c):
    i = _first_big(c)
    c.params = c.params + [c.params[i][1:3]]
    for k in ("dense", "tensor_ids", "offsets"):
        c.kw.pop(k, None)


def _dense_shifted(c):
    i = _first_big(c)
    p = c.params[i]
    base = c.tensor(p.numel() + 1, p.dtype)
    c.params[i] = base[:p.numel()].view_as(p)
    dense = c.kw.get("dense") or [torch.zeros_like(q) for q in c.params]
    dense[i] = base[1:].view_as(p)
    c.kw["dense"], c.kw["beta"] = dense, 0.5


def _inference_last(c):
    with torch.inference_mode():
        q = torch.randn(5, dtype=c.params[0].dtype)
    c.storages.append(q)
    c.params = c.params + [q]
    for k in ("dense", "tensor_ids", "offsets"):
        c.kw.pop(k, None)


def _sparse(c):
    s = torch.zeros(6, dtype=c.params[0].dtype)
    s[2] = 1.0
    sp = s.to_sparse()
    c.storages.append(sp)
    c.params = [sp] + c.params
    for k in ("dense", "tensor_ids", "offsets"):
        c.kw.pop(k, None)


def _noncontig(c):
    m = c.tensor(12, c.params[0].dtype).view(3, 4)
    c.params = c.params + [m.t()]
    for k in ("dense", "tensor_ids", "offsets"):
        c.kw.pop(k, None)


def _int_tensor(c):
    t = torch.arange(4)
    c.storages.append(t)
    c.params = c.params + [t]
    for k in ("dense", "tensor_ids", "offsets"):
        c.kw.pop(k, None)


def _non_leaf(c):
    leaf = torch.randn(4, dtype=c.params[0].dtype, requires_grad=True)
    c.storages.append(leaf)
    c.params = c.params + [leaf * 1]
    for k in ("dense", "tensor_ids", "offsets"):
        c.kw.pop(k, None)


def _set(**kw):
    def apply(c):
        for k, v in kw.items():
            if k == "alphas":
                c.alphas = list(v)
                c.keys = c.keys[:1] * len(c.alphas)
            elif k == "keys":
                c.keys = list(v)
                c.alphas = c.alphas[:1] * len(c.keys)
            else:
                c.kw[k] = v(c) if callable(v) else v
    return apply


def _exact_fp64(c):
    c.params = [c.tensor(8, torch.float64)]
    c.kw = {"undo": [0.0] * len(c.keys)}


def _planes_overlap(c):
    p = c.tensor(16, torch.bfloat16)
    c.params = [p]
    c.keys, c.alphas = c.keys[:1], c.alphas[:1]
    # a "plane" of the right size that is the param's own memory
    c.kw = {"undo": [0.0], "planes": [p.view(torch.uint8)[:4]]}


ALWAYS = lambda c: True     # noqa: E731
NOT_FP64 = lambda c: c.params[0].dtype != torch.float64    # noqa: E731 (float64 is computed in float64)
FAULTS = [
    ("overlapping views", ALWAYS, _overlap_views),
    ("view inside another param", _big, _contained_view),
    ("dense overlaps a param, shifted by one", _big, _dense_shifted),
    ("inference tensor last", ALWAYS, _inference_last),
    ("sparse tensor", ALWAYS, _sparse),
    ("non-contiguous", ALWAYS, _noncontig),
    ("integer tensor", ALWAYS, _int_tensor),
    ("non-leaf requiring grad", ALWAYS, _non_leaf),
    ("float key", ALWAYS, _set(keys=[1.5])),
    ("bool key", ALWAYS, _set(keys=[True])),
    ("key beyond 64 bits", ALWAYS, _set(keys=[1 << 64])),
    ("string alpha", ALWAYS, _set(alphas=["0.5"])),
    ("bool alpha", ALWAYS, _set(alphas=[True])),
    ("nan alpha", ALWAYS, _set(alphas=[math.nan])),
    ("alpha beyond float32", NOT_FP64, _set(alphas=[1e39])),
    ("gamma beyond float32", NOT_FP64, _set(gamma=1e39)),
    ("inf gamma", ALWAYS, _set(gamma=math.inf)),
    ("nan beta", ALWAYS, _set(beta=math.nan)),
    ("string gamma", ALWAYS, _set(gamma="1")),
    ("fractional tensor ids", ALWAYS, _set(tensor_ids=lambda c: [0.5 + i for i in range(len(c.params))])),
    ("tensor ids out of range", ALWAYS, _set(tensor_ids=lambda c: [1 << 32] * len(c.params))),
    ("tensor ids wrong length", ALWAYS, _set(tensor_ids=lambda c: list(range(len(c.params) + 1)))),
    ("fractional offsets", ALWAYS, _set(offsets=lambda c: [1.7] * len(c.params))),
    ("negative offsets", ALWAYS, _set(offsets=lambda c: [-4] * len(c.params))),
    ("bad rounding", ALWAYS, _set(rounding="up")),
    ("unknown backend", ALWAYS, _set(backend="fpga")),
    ("exact form on float64", ALWAYS, _exact_fp64),
    ("planes overlap the params", ALWAYS, _planes_overlap),
]


def _expected(c):
    """float64 transcription: θ ← γθ + Σ α_j z(k_j, id, offset) + β·dense, on the reference's z."""
    out = []
    ids = c.kw.get("tensor_ids") or list(range(len(c.params)))
    offs = c.kw.get("offsets") or [0] * len(c.params)
    dense = c.kw.get("dense")
    for i, p in enumerate(c.params):
        acc = c.kw.get("gamma", 1.0) * p.double().reshape(-1)
        noise_mag = torch.zeros_like(acc)
        for k, a in zip(c.keys, c.alphas):
            z = normal(k, ids[i], p.numel(), offset=offs[i]).double()
            acc = acc + a * z
            noise_mag = noise_mag + abs(a) * z.abs().clamp_min(1.0)
        if dense is not None:
            acc = acc + c.kw.get("beta", 0.0) * dense[i].double().reshape(-1)
        out.append((acc, noise_mag))
    return out


def _bits(t):
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.detach().clone().contiguous().view(torch.uint8) if t.numel() else t.detach().clone()


def test_fuzz_every_call_succeeds_correctly_or_raises_untouched():
    rng = random.Random(20261201)
    counts = {"ok": 0, "refused": 0}
    for n in range(N_CALLS):
        c = make_case(rng)
        before = [_bits(t) for t in c.storages]
        expected = None if c.bad else _expected(c)
        try:
            zo_kernels.noise_axpy_(c.params, c.keys, c.alphas, **c.kw)
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
            assert c.bad is not None, f"call {n}: a valid call raised {e!r}"
            for t, b in zip(c.storages, before):
                assert torch.equal(_bits(t), b), f"call {n} ({c.bad}): refused ({e}) but a tensor was written"
            counts["refused"] += 1
            continue
        assert c.bad is None, f"call {n}: '{c.bad}' was accepted"
        for i, (p, (exp, mag)) in enumerate(zip(c.params, expected)):
            got = p.double().reshape(-1)
            tol = _ulp(exp, p.dtype).double() + 1e-5 * mag + 1e-6 * (exp.abs() + mag) + 1e-30
            bad = (got - exp).abs() > tol
            assert not bad.any(), f"call {n}: params[{i}] ({p.dtype}) off by {(got - exp).abs().max().item()}"
        counts["ok"] += 1
    print(counts)
    assert counts["ok"] > 50 and counts["refused"] > 150, counts


def test_fuzz_failed_steps_leave_weights_bit_identical():
    """40 seeded episodes: a random optimizer set-up (MeZO / lookahead / MeZO-SVRG dense or replay; fp32,
    bf16 or fp16; restore auto / fused / exact; snapshot=True), a few good steps, then a closure that
    raises or returns NaN/inf at a random evaluation: the weights are bit-identical and the step
    counter unchanged, and the next good step succeeds."""
    from zo_kernels.optim import MeZO, MeZOSVRG, NonFiniteLossError

    rng = random.Random(12)
    for ep in range(40):
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        kind = rng.choice(["mezo", "lookahead", "dense", "replay"])
        restore = rng.choice(["auto", "fused"] + ([] if kind == "lookahead" else ["exact"]))
        g = torch.Generator().manual_seed(ep)
        ps = [torch.nn.Parameter((torch.randn(n, generator=g) * 0.05).to(dtype)) for n in (rng.randint(1, 40), 7)]
        common = dict(lr=1e-2, eps=1e-3, seed=ep, restore=restore, snapshot=True, backend="cpu",
                      plane_bits=rng.choice([0, 2, 8]))
        if kind in ("mezo", "lookahead"):
            opt = MeZO(ps, lookahead=kind == "lookahead", **common)
        else:
            opt = MeZOSVRG(ps, lr_full=2e-2, q=rng.randint(1, 3), anchor=kind, **common)
        count = {"n": 0}
        fail = {"at": None, "how": None}

        def closure():
            count["n"] += 1
            if count["n"] == fail["at"]:
                if fail["how"] == "raise":
                    raise KeyboardInterrupt if rng.random() < 0.2 else ValueError("closure failed")
                return torch.tensor(rng.choice([math.nan, math.inf]))
            return sum((p.double() - 0.01).square().sum() for p in ps)

        def step():
            if isinstance(opt, MeZOSVRG):
                return opt.step(closure, full_closure=closure if opt.is_full_step else None)
            return opt.step(closure)

        for _ in range(rng.randint(0, 4)):
            step()
        t = opt.step_count
        before = [p.detach().clone() for p in ps]
        count["n"], fail["at"], fail["how"] = 0, rng.randint(1, 4), rng.choice(["raise", "nan"])
        try:
            step()
            assert count["n"] < fail["at"], f"episode {ep}: the failure at evaluation {fail['at']} went unnoticed"
        except (ValueError, KeyboardInterrupt, NonFiniteLossError):
            for p, b in zip(ps, before):
                assert torch.equal(p.view(torch.int16 if p.element_size() == 2 else torch.int32),
                                   b.view(torch.int16 if b.element_size() == 2 else torch.int32)), (ep, kind, restore)
            assert opt.step_count == t
        fail["at"] = None
        step()
