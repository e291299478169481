"""HiZOO against the float64 transcription of the authors' zo_Hessian_step_update (naive.hizoo), step by step
(weights and h = σ⁻²; σ in float32, and in bfloat16 within its rounding); the update pass against its own
float64 statement; the three forwards; failed steps; resume and replay bit-identical (both σ dtypes).

z is materialised with zo_kernels.noise_ (the values the passes regenerate); the loss is float64 inside
the test MLP.  The smoothing is large (0.5) so that h moves far from 1 and a wrong order would show.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels.hizoo import hizoo_update_
from zo_kernels.noise import step_key
from zo_kernels.optim import HiZOO, NonFiniteLossError, naive, replay

from optim_helpers import _one_thread, data, gpu_backends, make_net, mlp, rel, run_steps  # noqa: F401 (autouse)

BACKEND = "reference"
LR, MU, SEED, STEPS, A = 2.0 ** -6, 5e-2, 11, 6, 0.5


def zs(t, shapes, noise="gaussian"):
    return [zo_kernels.noise_(torch.empty(s), step_key(SEED, t), i, backend=BACKEND, noise=noise).double()
            for i, s in enumerate(shapes)]


def setup(seed=0):
    x, y, batches = data(steps=40)
    net = make_net(seed)
    return net, [p.detach().clone().double() for p in net.parameters()], x, y, batches


def make(params, **kw):
    return HiZOO(params, **dict(dict(lr=LR, eps=MU, seed=SEED, smoothing=A, backend=BACKEND), **kw))


def sigmas(opt, net):
    return [opt.state[p]["sigma"] for p in net.parameters()]


# The step-by-step transcriptions run here on the reference, and on a GPU with its kernels (the scaled passes
# and the update pass's z on Triton and the CUDA C++ kernel; pytest -m cuda, scripts/gpu_check.sh).
RUNS = [pytest.param(BACKEND, "cpu", id="reference-cpu")] + gpu_backends()


def on(device, net, x, y):
    """The net and the data on `device` (the transcriptions stay on the CPU, in float64)."""
    return net.to(device), x.to(device), y.to(device)


@pytest.mark.parametrize("backend,device", RUNS)
@pytest.mark.parametrize("noise,wd", [("gaussian", 0.0), ("rademacher", 0.5)])
def test_matches_authors_update_step_by_step(noise, wd, backend, device):
    net, theta0, x, y, batches = setup()
    loss = lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item()  # noqa: E731
    net, xd, yd = on(device, net, x, y)
    opt = make(net.parameters(), weight_decay=wd, noise=noise, backend=backend)
    theta, h = theta0, None
    for t in range(STEPS):
        got = run_steps(opt, net, xd, yd, batches, 1, t)[0]
        # naive.hizoo's step, from the carried (θ, h) (the function starts from h = 1)
        z = zs(t, [p.shape for p in theta0], noise)
        h = h or [torch.ones_like(p) for p in theta0]
        l0 = loss(theta, batches[t])
        lp = loss([p + MU * zi / hi.sqrt() for p, zi, hi in zip(theta, z, h)], batches[t])
        lm = loss([p - MU * zi / hi.sqrt() for p, zi, hi in zip(theta, z, h)], batches[t])
        h = [(1 - A) * hi + abs(lp + lm - 2 * l0) * hi * zi * zi * A / (2 * MU * MU) for hi, zi in zip(h, z)]
        theta = [p - LR * ((lp - lm) / (2 * MU) * zi / hi.sqrt() + wd * p) for p, zi, hi in zip(theta, z, h)]
        assert rel(net.parameters(), theta) < 1e-6, t
        # c is a second difference of forwards at fp32 weights (|Δθ| ~ ulp): ~1e-5 of a·c·z² is noise
        assert rel(sigmas(opt, net), [hi ** -0.5 for hi in h]) < 1e-5, t
        assert abs(got - l0) < 1e-6
    assert rel(theta, theta0) > 1e-3
    assert rel([hi ** -0.5 for hi in h], [torch.ones_like(hi) for hi in h]) > 1e-2   # h moved: order matters


# A stored bfloat16 σ is one of the two bf16 neighbours of the float32 update (stochastic rounding), so within one
# bf16 step of it: 2^-7 of its magnitude (8 significant bits).
BF16_STEP = 2.0 ** -7


@pytest.mark.parametrize("backend,device", RUNS)
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_bf16_sigma_matches_authors_update_step_by_step(noise, backend, device):
    """σ stored in bfloat16: each step from the optimizer's own (θ_t, σ_t), the authors' update in float64; the
    new σ within one bf16 step of the float64 h^(-1/2) (plus the float32 forwards' 1e-5 noise in c, as above),
    and θ updated with σ as stored, within float32."""
    net, theta0, x, y, batches = setup()
    loss = lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item()  # noqa: E731
    net, xd, yd = on(device, net, x, y)
    opt = make(net.parameters(), sigma_dtype=torch.bfloat16, noise=noise, backend=backend)
    for t in range(STEPS):
        theta = [p.detach().double().cpu() for p in net.parameters()]
        sig = [torch.ones_like(p) for p in theta] if t == 0 else [s.double().cpu() for s in sigmas(opt, net)]
        run_steps(opt, net, xd, yd, batches, 1, t)
        z = zs(t, [p.shape for p in theta0], noise)
        l0 = loss(theta, batches[t])
        lp = loss([p + MU * s * zi for p, s, zi in zip(theta, sig, z)], batches[t])
        lm = loss([p - MU * s * zi for p, s, zi in zip(theta, sig, z)], batches[t])
        c = abs(lp + lm - 2 * l0) / (2 * MU * MU)
        s64 = [s / torch.sqrt((1 - A) + A * c * zi * zi) for s, zi in zip(sig, z)]
        new = [s.cpu() for s in sigmas(opt, net)]
        assert all(s.dtype == torch.bfloat16 for s in new)
        for got, want in zip(new, s64):
            assert ((got.double() - want).abs() <= (BF16_STEP + 1e-5) * want).all(), t
        want = [p - LR * (lp - lm) / (2 * MU) * s.double() * zi for p, s, zi in zip(theta, new, z)]
        assert rel(net.parameters(), want) < 1e-6, t
    assert rel(sigmas(opt, net), [torch.ones_like(p) for p in theta0]) > 1e-2   # σ moved


def test_whole_run_matches_naive_hizoo():
    """The whole run against naive.hizoo (the transcription as a function), and the smoothing matters."""
    net, theta0, x, y, batches = setup()
    run_steps(make(net.parameters()), net, x, y, batches, STEPS)
    loss = lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item()  # noqa: E731
    run = lambda a: naive.hizoo(theta0, loss, batches, lr=LR, mu=MU, steps=STEPS,  # noqa: E731
                                noise=lambda t: zs(t, [p.shape for p in theta0]), smoothing=lambda t: a)
    want, h, clean = run(A)
    assert rel(net.parameters(), want) < 1e-6
    assert rel(want, run(0.0)[0]) > 1e-3
    assert len(clean) == STEPS


def test_smoothing_zero_is_mezo():
    """a = 0 (the authors' default schedule "constant0"): h stays 1, the steps are MeZO's."""
    net, theta0, x, y, batches = setup()
    opt = make(net.parameters(), smoothing="constant0")
    run_steps(opt, net, x, y, batches, 4)
    loss = lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item()  # noqa: E731
    want, _ = naive.mezo(theta0, loss, batches, lr=LR, mu=MU, steps=4, noise=lambda t: zs(t, [p.shape for p in theta0]))
    assert rel(net.parameters(), want) < 1e-6
    assert all(torch.equal(s, torch.ones_like(s)) for s in sigmas(opt, net))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_pass_against_float64(dtype):
    """hizoo_update_ on shards at offsets: σ and θ as the float64 statement (module doc), within float32
    (bf16: one grid step of the float64 value)."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(3000, generator=g).to(dtype)
    sigma = torch.rand(3000, generator=g) + 0.5
    key, a, c, coeff, gamma = step_key(4, 2), 0.3, 2.5, -0.01, 0.99
    p, s = theta.clone(), sigma.clone()
    cuts = [0, 7, 1500, 3000]
    hizoo_update_([p[i:j] for i, j in zip(cuts, cuts[1:])], [s[i:j] for i, j in zip(cuts, cuts[1:])], key,
                  coeff=coeff, gamma=gamma, smoothing=a, curvature=c, tensor_ids=[5] * 3, offsets=cuts[:-1],
                  backend=BACKEND)
    z = zo_kernels.noise_(torch.empty(3000), key, 5, backend=BACKEND).double()
    s64 = sigma.double() / torch.sqrt((1 - a) + a * c * z * z)
    t64 = gamma * theta.double() + coeff * s64 * z
    assert ((s.double() - s64).abs() <= 4e-7 * s64).all()
    if dtype == torch.float32:
        assert ((p.double() - t64).abs() <= 1e-6 * (t64.abs() + 0.01)).all()
    else:
        assert ((p.double() - t64).abs() <= 2.0 ** -7 * t64.abs() + 1e-30).all()


def test_update_pass_bf16_sigma_against_float64():
    """A bfloat16 σ: the float64 statement's σ within one bf16 step (2^-7 of it; float32's own error is far
    below), and θ updated with σ as stored."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(3000, generator=g)
    sigma = (torch.rand(3000, generator=g) + 0.5).to(torch.bfloat16)
    key, a, c, coeff, gamma = step_key(4, 2), 0.3, 2.5, -0.01, 0.99
    p, s = theta.clone(), sigma.clone()
    cuts = [0, 7, 1500, 3000]
    hizoo_update_([p[i:j] for i, j in zip(cuts, cuts[1:])], [s[i:j] for i, j in zip(cuts, cuts[1:])], key,
                  coeff=coeff, gamma=gamma, smoothing=a, curvature=c, tensor_ids=[5] * 3, offsets=cuts[:-1],
                  rounding_key=9, backend=BACKEND)
    z = zo_kernels.noise_(torch.empty(3000), key, 5, backend=BACKEND).double()
    s64 = sigma.double() / torch.sqrt((1 - a) + a * c * z * z)
    assert s.dtype == torch.bfloat16
    assert ((s.double() - s64).abs() <= (BF16_STEP + 1e-6) * s64).all()
    t64 = gamma * theta.double() + coeff * s.double() * z
    assert ((p.double() - t64).abs() <= 1e-6 * (t64.abs() + 0.01)).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bf16_sigma_rounding_bits_are_the_reference_streams(backend):
    """The stored bf16 σ is the reference stochastic rounding (spec §3, stream 2) of σ/√f under the key
    mix_keys(SIGMA_TAG, key, rounding_key), at each element's own tensor id and offset, whichever backend
    runs the pass (the native op's rounding must draw exactly those bits)."""
    from zo_kernels.hizoo import SIGMA_TAG
    from zo_kernels.noise import mix_keys, random_words, stochastic_round

    if backend not in zo_kernels.available_backends():
        pytest.skip(f"{backend} backend not built")
    g = torch.Generator().manual_seed(5)
    sigma = (torch.rand(5000, generator=g) + 0.5).to(torch.bfloat16)
    key, a, c = step_key(6, 1), 0.2, 3.0
    s, p = sigma.clone(), torch.zeros(5000)
    hizoo_update_([p[:1000], p[1000:]], [s[:1000], s[1000:]], key, coeff=0.0, smoothing=a, curvature=c,
                  tensor_ids=[2, 4], offsets=[0, 77], rounding_key=11, backend=backend)
    z = torch.cat([zo_kernels.noise_(torch.empty(1000), key, 2, backend="reference"),
                   zo_kernels.noise_(torch.empty(4000), key, 4, 77, backend="reference")])
    new = sigma.float() / torch.sqrt(torch.tensor(1 - a) + torch.tensor(a * c) * (z * z))
    sk = mix_keys(SIGMA_TAG, key, 11)
    words = torch.cat([random_words(sk, 2, 1000), random_words(sk, 4, 4000, offset=77)])
    assert torch.equal(s, stochastic_round(new, torch.bfloat16, words))


def test_bf16_sigma_rounding_is_unbiased_where_nearest_would_freeze_it():
    """a = 1e-3, c = 0: every σ ∈ [1, 2) grows by 1/√(1 − a) − 1 ≈ 5e-4, an eighth of half a bf16 step there
    (2^-8): round-to-nearest would keep every σ.  Stochastic rounding is unbiased: the mean error over N
    elements, each error in an interval one step (2^-7) long with mean 0, has standard deviation at most
    2^-7/(2√N); 5 of those is the bound, and the mean growth (≈ 5e-4) is far outside it."""
    n = 20000
    g = torch.Generator().manual_seed(8)
    sigma = (1 + torch.rand(n, generator=g)).to(torch.bfloat16)
    s, p = sigma.clone(), torch.zeros(n)
    hizoo_update_([p], [s], step_key(2, 7), coeff=0.0, smoothing=1e-3, curvature=0.0, backend=BACKEND)
    s64 = sigma.double() / math.sqrt(1 - 1e-3)
    assert abs((s.double() - s64).mean().item()) <= 5 * BF16_STEP / (2 * math.sqrt(n))
    assert (s.double() - sigma.double()).mean().item() > 2.5e-4


def test_three_forwards_and_scaled_passes():
    """l0 at θ, then θ ± μσz: the closure sees exactly those points (σ from the state); 4 weight passes."""
    net, theta0, x, y, batches = setup()
    opt = make(net.parameters(), record=True)
    run_steps(opt, net, x, y, batches, 3)
    theta1 = [p.detach().clone().double() for p in net.parameters()]
    sig = [s.clone().double() for s in sigmas(opt, net)]
    seen = []

    def closure():
        seen.append([p.detach().clone().double() for p in net.parameters()])
        return F.cross_entropy(net(x[batches[3]]), y[batches[3]])

    n = len(opt.trajectory)
    opt.step(closure)
    assert len(seen) == opt.queries_per_step == 3
    z = zs(3, [p.shape for p in theta0])
    assert rel(seen[0], theta1) == 0
    assert rel(seen[1], [p + MU * s * zi for p, s, zi in zip(theta1, sig, z)]) < 1e-7
    assert rel(seen[2], [p - MU * s * zi for p, s, zi in zip(theta1, sig, z)]) < 1e-7
    recs = opt.trajectory[n:]
    assert [bool(r.get("scaled")) for r in recs] == [True, True, True, False] and recs[-1]["hizoo"]


@pytest.mark.parametrize("snapshot", [False, True])
def test_failed_step_restores_weights_and_sigma(snapshot):
    net, theta0, x, y, batches = setup()
    opt = make(net.parameters(), snapshot=snapshot)
    run_steps(opt, net, x, y, batches, 2)
    before = [p.detach().clone() for p in net.parameters()]
    sig = [s.clone() for s in sigmas(opt, net)]
    n = [0]

    def closure():
        n[0] += 1
        return torch.tensor(float("nan")) if n[0] == 3 else F.cross_entropy(net(x[batches[0]]), y[batches[0]])

    with pytest.raises(NonFiniteLossError, match="loss"):
        opt.step(closure)
    assert opt.step_count == 2 and n[0] == 3
    assert all(torch.equal(a, b) for a, b in zip(sigmas(opt, net), sig))
    if snapshot:
        assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
    else:
        assert rel(net.parameters(), before) < 1e-7


SIGMA_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("sigma_dtype", SIGMA_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_bit_identical(dtype, sigma_dtype):
    net, _, x, y, batches = setup()
    net.to(dtype)
    opt = make(net.parameters(), smoothing="constant1e-2", sigma_dtype=sigma_dtype)
    run_steps(opt, net, x, y, batches, 4)
    saved_w, saved_o = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    run_steps(opt, net, x, y, batches, 3, 4)
    net2 = make_net(1).to(dtype)
    net2.load_state_dict(saved_w)
    opt2 = make(net2.parameters(), smoothing="constant1e-2", sigma_dtype=sigma_dtype)
    opt2.load_state_dict(saved_o)
    run_steps(opt2, net2, x, y, batches, 3, 4)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    assert all(s.dtype == sigma_dtype and torch.equal(s, s2) for s, s2 in zip(sigmas(opt, net), sigmas(opt2, net2)))
    with pytest.raises(ValueError, match="smoothing"):
        make(make_net(1).parameters(), smoothing=0.1, sigma_dtype=sigma_dtype).load_state_dict(saved_o)
    other = [d for d in SIGMA_DTYPES if d != sigma_dtype][0]
    with pytest.raises(ValueError, match="sigma"):
        make(make_net(1).to(dtype).parameters(), smoothing="constant1e-2", sigma_dtype=other).load_state_dict(saved_o)


@pytest.mark.parametrize("sigma_dtype", SIGMA_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_bit_identical(dtype, sigma_dtype):
    net, _, x, y, batches = setup()
    net.to(dtype)
    start = [p.detach().clone() for p in net.parameters()]
    opt = make(net.parameters(), record=True, weight_decay=0.1, rounding="stochastic" if dtype != torch.float32
               else "nearest", sigma_dtype=sigma_dtype)
    run_steps(opt, net, x, y, batches, 5)
    ps = [torch.nn.Parameter(p.clone()) for p in start]
    replay(ps, opt.trajectory, backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(ps, net.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(ps, start))


def test_bad_arguments():
    ps = make_net(0).parameters
    with pytest.raises(ValueError, match="one direction"):
        make(ps(), n_directions=2)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        make(ps(), smoothing=1.0)
    with pytest.raises(ValueError, match="not one of"):
        make(ps(), smoothing="constant7")
    with pytest.raises(ValueError, match="sigma_dtype must be one of"):
        make(ps(), sigma_dtype=torch.float16)
    assert make(ps(), sigma_dtype="bfloat16").sigma_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="layer sampling|layer_fraction"):
        make(ps(), layer_fraction=0.5)
    assert math.isclose(make(ps(), smoothing="constant_decay1").smoothing_at(9800), 1e-8)
