"""FZOO against the float64 transcription of the authors' zo_step/zo_update (zo_kernels.optim.naive.fzoo),
step by step; σ = 0; the N + 1 passes per step (one fused update); failed steps; resume and replay.

z is materialised with zo_kernels.noise_ (the values the optimizer's passes regenerate); the loss is
float64 inside the test MLP.  Tolerance as test_optim_zobench.py: 1e-6 relative on the weights.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels.optim import FZOO, NonFiniteLossError, naive, replay
from zo_kernels.optim.fzoo import fzoo_coefficients
from zo_kernels.optim.spsa import direction_key

from optim_helpers import _one_thread, data, make_net, mlp, rel, run_steps  # noqa: F401 (_one_thread: autouse)

BACKEND = "reference"
LR, MU, SEED, N, STEPS = 2.0 ** -7, 1e-2, 11, 4, 12


def zs(t, j, shapes, noise="gaussian"):
    k = direction_key(SEED, t, j)
    kw = {} if noise == "gaussian" else {"noise": noise}
    return [zo_kernels.noise_(torch.empty(s), k, i, backend=BACKEND, **kw).double() for i, s in enumerate(shapes)]


def fzoo64(theta, x, y, batches, steps=STEPS, n=N, wd=0.0, noise="gaussian", t0=0):
    """naive.fzoo on batches[t0:], its step t using the noise of step t0 + t."""
    return naive.fzoo(theta, lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item(), batches[t0:],
                      lr=LR, mu=MU, n=n, wd=wd, steps=steps,
                      noise=lambda t, j: zs(t0 + t, j, [p.shape for p in theta], noise))


def setup(seed=0):
    x, y, batches = data(steps=40)
    net = make_net(seed)
    return net, [p.detach().clone().double() for p in net.parameters()], x, y, batches


def make(params, **kw):
    args = dict(lr=LR, eps=MU, seed=SEED, n_directions=N, noise="gaussian", backend=BACKEND)
    args.update(kw)
    return FZOO(params, **args)


NOISES = ["gaussian", "rademacher"]


# ------------------------------------------------------------------------------ the update
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_matches_authors_update_step_by_step(noise, wd):
    net, theta0, x, y, batches = setup()
    opt = make(net.parameters(), weight_decay=wd, noise=noise)
    theta = theta0
    for t in range(STEPS):
        got = run_steps(opt, net, x, y, batches, 1, t)[0]
        theta, clean = fzoo64(theta, x, y, batches, steps=1, wd=wd, noise=noise, t0=t)
        assert rel(net.parameters(), theta) < 1e-6, t
        assert abs(got - clean[0]) < 1e-6          # step returns l_0, the clean loss
    assert rel(theta, theta0) > 1e-3                   # it moved: the comparison can fail


def test_whole_run_matches_and_n_matters():
    net, theta0, x, y, batches = setup()
    run_steps(make(net.parameters()), net, x, y, batches, STEPS)
    want, _ = fzoo64(theta0, x, y, batches)
    assert rel(net.parameters(), want) < 1e-6
    assert rel(want, fzoo64(theta0, x, y, batches, n=2)[0]) > 1e-3


def test_coefficients_are_the_authors():
    """(l_i − l_0)/(N·std(unbiased=False)) against torch's std of the same losses."""
    ls, l0 = [0.7, 0.2, 0.9, 0.4, 0.55], 0.5
    t = torch.tensor(ls, dtype=torch.float64)
    want = ((t - l0) / (len(ls) * t.std(unbiased=False))).tolist()
    assert fzoo_coefficients(l0, ls) == pytest.approx(want, rel=1e-14)


def test_sigma_zero_makes_no_gradient_move():
    """Equal perturbed losses: coefficients 0, no division by zero; the update pass only removes μz_N
    (and applies γ), so the weights come back to θ within the fused restore's rounding."""
    assert fzoo_coefficients(0.3, [0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]
    net, theta0, x, y, batches = setup()
    opt = make(net.parameters(), record=True)
    loss = opt.step(lambda: torch.tensor(1.25))
    assert loss == 1.25 and opt.step_count == 1
    last = opt.trajectory[-1]
    assert last["keys"] == [direction_key(SEED, 0, N - 1) & (2 ** 64 - 1)] and last["alphas"] == [-MU]
    assert all(math.isfinite(a) for r in opt.trajectory for a in r["alphas"])
    assert rel(net.parameters(), theta0) < 1e-7


# ------------------------------------------------------------------------- passes and queries
def test_n_plus_one_passes_and_queries_per_step():
    """N moves (the first from θ, each later one from the previous perturbation: two keys) and ONE
    update pass with all N keys that also removes μz_N; N + 1 closure calls."""
    net, _, x, y, batches = setup()
    opt = make(net.parameters(), record=True)
    calls = [0]

    def closure():
        calls[0] += 1
        return F.cross_entropy(net(x[batches[0]]), y[batches[0]])

    opt.step(closure)
    keys = [direction_key(SEED, 0, j) & (2 ** 64 - 1) for j in range(N)]
    assert calls[0] == opt.queries_per_step == N + 1
    assert len(opt.trajectory) == N + 1
    assert [r["keys"] for r in opt.trajectory[:N]] == [[keys[0]]] + [[keys[j - 1], keys[j]] for j in range(1, N)]
    assert [r["alphas"] for r in opt.trajectory[:N]] == [[MU]] + [[-MU, MU]] * (N - 1)
    last = opt.trajectory[-1]
    assert sorted(last["keys"]) == sorted(keys) and last["rounding"] == "nearest"


def test_clean_forward_comes_first():
    net, theta0, x, y, batches = setup()
    opt = make(net.parameters())
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in net.parameters()])
        return F.cross_entropy(net(x[batches[0]]), y[batches[0]])

    opt.step(closure)
    assert all(torch.equal(a, b.float()) for a, b in zip(seen[0], theta0))
    z0 = zs(0, 0, [p.shape for p in theta0])
    assert rel(seen[1], [p + MU * z for p, z in zip(theta0, z0)]) < 1e-7


# ------------------------------------------------------------------------- failure, resume, replay
@pytest.mark.parametrize("snapshot", [False, True])
def test_failed_step_restores(snapshot):
    net, theta0, x, y, batches = setup()
    opt = make(net.parameters(), snapshot=snapshot)
    n = [0]

    def closure():
        n[0] += 1
        if n[0] == 3:
            return torch.tensor(float("nan"))
        return F.cross_entropy(net(x[batches[0]]), y[batches[0]])

    with pytest.raises(NonFiniteLossError, match="loss"):
        opt.step(closure)
    assert opt.step_count == 0 and n[0] == N + 1
    if snapshot:
        assert all(torch.equal(a, b.float()) for a, b in zip(net.parameters(), theta0))
    else:
        assert rel(net.parameters(), theta0) < 1e-7


@pytest.mark.parametrize("noise", NOISES)
def test_state_dict_resume_bit_identical(noise):
    net, _, x, y, batches = setup()
    opt = make(net.parameters(), noise=noise)
    run_steps(opt, net, x, y, batches, 4)
    saved_w, saved_o = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    run_steps(opt, net, x, y, batches, 3, 4)
    net2 = make_net(1)
    net2.load_state_dict(saved_w)
    opt2 = make(net2.parameters(), noise=noise)
    opt2.load_state_dict(saved_o)
    run_steps(opt2, net2, x, y, batches, 3, 4)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    with pytest.raises(ValueError, match="n_directions"):
        make(make_net(1).parameters(), noise=noise, n_directions=3).load_state_dict(saved_o)


@pytest.mark.parametrize("noise", NOISES)
def test_replay_bit_identical(noise):
    net, _, x, y, batches = setup()
    start = [p.detach().clone() for p in net.parameters()]
    opt = make(net.parameters(), noise=noise, record=True, weight_decay=0.1)
    run_steps(opt, net, x, y, batches, 5)
    ps = [torch.nn.Parameter(p.clone()) for p in start]
    replay(ps, opt.trajectory, backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(ps, net.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(ps, start))


def test_default_noise_is_rademacher_and_differs_from_gaussian():
    runs = {}
    for kw in ({}, {"noise": "rademacher"}, {"noise": "gaussian"}):
        net, _, x, y, batches = setup()
        opt = FZOO(net.parameters(), lr=LR, eps=MU, seed=SEED, n_directions=N, backend=BACKEND, **kw)
        run_steps(opt, net, x, y, batches, 3)
        runs[kw.get("noise")] = [p.detach().clone() for p in net.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs[None], runs["rademacher"]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[None], runs["gaussian"]))


# ------------------------------------------------------------------------------- arguments
def test_bad_arguments():
    ps = make_net(0).parameters
    with pytest.raises(ValueError, match="n_directions >= 2"):
        make(ps(), n_directions=1)
    with pytest.raises(ValueError, match="n_directions"):
        make(ps(), n_directions=0)
    with pytest.raises(ValueError, match="noise must be one of"):
        make(ps(), noise="uniform")
    with pytest.raises(TypeError, match="closure"):
        make(ps()).step()



def test_bf16_exact_restore_through_the_n_moves():
    """bf16 weights (exact restore): the N moves θ → θ+μz_1 → … → θ+μz_N are one excursion from θ, so a
    σ = 0 step (update: only remove μz_N) brings θ back bit-identical except the ambiguous tiny elements
    |θ| < μ|z|/(2^plane_bits − 1) (ZOOptimizer's docstring; |z| = 1 for ±1)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter((torch.randn(64, 32) * 0.1).bfloat16()), torch.nn.Parameter((torch.randn(64) * 0.1).bfloat16())]
    w0 = [p.detach().clone() for p in ps]
    opt = FZOO(ps, lr=1e-2, eps=1e-3, n_directions=4, noise="rademacher", backend=BACKEND, record=True)
    opt.step(lambda: torch.tensor(0.5))
    assert [r.get("plane") for r in opt.trajectory] == ["write"] + ["read"] * 4
    for p, p0 in zip(ps, w0):
        off = p != p0
        assert (p0[off].float().abs() < 1e-3 / 3).all()
    assert sum(int((p != p0).sum()) for p, p0 in zip(ps, w0)) < 10
