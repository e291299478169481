"""ZO-Bench's optimizer family against float64 transcriptions of the published updates (z materialised
with zo_kernels.noise_, the same values the optimizers regenerate), plus the core features.

Tolerances as test_optim_mezo.py: the loss is float64 inside the test MLP; weights within 1e-6
relative after the run (ZO-Adam: 1e-5, its update divides by √v).
"""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels.optim import (
    LOZOM,
    ForwardGrad,
    MeZO,
    NonFiniteLossError,
    ZOAdam,
    ZOSGDCons,
    ZOSGDMomentum,
    ZOSGDSign,
    naive,
    replay,
)
from zo_kernels.optim.spsa import direction_key

from backends_helpers import backends_on
from optim_helpers import _one_thread, data, make_net, mlp, rel, run_steps  # noqa: F401 (_one_thread: autouse)

BACKEND = "reference"
LR, MU, SEED, STEPS = 2.0 ** -7, 1e-2, 11, 20


def zs(seed, t, j, shapes):
    """z of direction j of step t, materialised with noise_ (fp32, as the optimizers' passes use it)."""
    k = direction_key(seed, t, j)
    return [zo_kernels.noise_(torch.empty(s), k, i, backend=BACKEND).double() for i, s in enumerate(shapes)]


def loss64(theta, x, y, idx):
    return F.cross_entropy(mlp(theta, x[idx]), y[idx]).item()


def spsa64(theta, x, y, idx, t, q, mu=MU, seed=SEED):
    """The q two-point differences d_j and the z_j of step t (float64)."""
    return naive.spsa_directions(theta, lambda ps, i: loss64(ps, x, y, i), idx, t, q, mu,
                                 lambda t_, j: zs(seed, t_, j, [p.shape for p in theta]))


def run(opt, net, x, y, batches, steps=STEPS, t0=0):
    return run_steps(opt, net, x, y, batches, steps, t0)


def setup(seed=0):
    x, y, batches = data(steps=40)
    net = make_net(seed)
    theta0 = [p.detach().clone().double() for p in net.parameters()]
    return net, theta0, x, y, batches


# ---------------------------------------------- transcriptions of the updates (zo_kernels.optim.naive)
def _loss_noise(theta, x, y):
    return (lambda ps, idx: loss64(ps, x, y, idx)), (lambda t, j: zs(SEED, t, j, [p.shape for p in theta]))


def sign_sgd64(theta, x, y, batches, q, steps=STEPS, wd=0.0):
    loss, noise = _loss_noise(theta, x, y)
    return naive.sign_sgd(theta, loss, batches, lr=LR, mu=MU, q=q, noise=noise, wd=wd, steps=steps)


def nspsa64(theta, x, y, batches, q, steps=STEPS, wd=0.0):
    loss, noise = _loss_noise(theta, x, y)
    return naive.n_spsa(theta, loss, batches, lr=LR, mu=MU, q=q, noise=noise, wd=wd, steps=steps)


def momentum64(theta, x, y, batches, beta, q=1, steps=STEPS, window=None):
    loss, noise = _loss_noise(theta, x, y)
    return naive.momentum_sgd(theta, loss, batches, lr=LR, mu=MU, beta=beta, noise=noise, q=q, steps=steps,
                              window=window)


def adam64(theta, x, y, batches, q=1, steps=STEPS, betas=(0.9, 0.999), eps=1e-8, wd=0.0):
    loss, noise = _loss_noise(theta, x, y)
    return naive.adam(theta, loss, batches, lr=LR, mu=MU, noise=noise, q=q, steps=steps, betas=betas, eps=eps, wd=wd)


def cons64(theta, x, y, batches, q=1, steps=STEPS, lr=LR):
    loss, noise = _loss_noise(theta, x, y)
    return naive.cons(theta, loss, batches, lr=lr, mu=MU, noise=noise, q=q, steps=steps)


def forward_grad64(theta, x, y, batches, steps=STEPS, wd=0.0):
    _, noise = _loss_noise(theta, x, y)
    return naive.forward_grad(theta, lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]), batches, lr=LR,
                              noise=noise, wd=wd, steps=steps)


# -------------------------------------------------------------------------------- updates
@pytest.mark.parametrize("q", [1, 3])
def test_sign_matches_zobench_update(q):
    net, theta0, x, y, batches = setup()
    run(ZOSGDSign(net.parameters(), lr=LR, eps=MU, seed=SEED, n_directions=q, backend=BACKEND), net, x, y, batches)
    assert rel(net.parameters(), sign_sgd64(theta0, x, y, batches, q)) < 1e-6


def test_nspsa_matches_zobench_q_loop():
    net, theta0, x, y, batches = setup()
    run(MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, n_directions=4, backend=BACKEND), net, x, y, batches)
    want = nspsa64(theta0, x, y, batches, 4)
    assert rel(net.parameters(), want) < 1e-6
    assert rel(want, nspsa64(theta0, x, y, batches, 1)) > 1e-3      # q matters: the test can fail


def test_nspsa_q1_is_mezo_bit_for_bit():
    runs = []
    for q in (1, None):
        net, _, x, y, batches = setup()
        kw = {} if q is None else dict(n_directions=q)
        run(MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, backend=BACKEND, **kw), net, x, y, batches, steps=5)
        runs.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_nspsa_single_pass_equals_q_sequential_passes():
    """The update of q directions is one multi-key pass; q sequential single-key passes of the same
    coefficients give the same weights within fp32 rounding (a few ulps of the magnitudes involved)."""
    q = 5
    net, _, x, y, batches = setup()
    theta0 = [p.detach().clone() for p in net.parameters()]
    opt = MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, n_directions=q, backend=BACKEND, record=True)
    calls = len(opt.trajectory)
    run(opt, net, x, y, batches, steps=1)
    last = opt.trajectory[-1]
    assert len(opt.trajectory) - calls == 2 * q + 1 and len(last["keys"]) == q   # one update pass, q keys
    keys = [direction_key(SEED, 0, j) for j in range(q)]
    assert sorted(last["keys"]) == sorted(keys)
    alpha = dict(zip(last["keys"], last["alphas"]))
    coeffs = [alpha[k] - (MU if j == q - 1 else 0.0) for j, k in enumerate(keys)]  # last: also removes −μz
    seq = [p.clone() for p in theta0]
    for k, c in zip(keys, coeffs):
        zo_kernels.noise_axpy_(seq, [k], [c], backend=BACKEND)
    z = [zs(SEED, 0, j, [p.shape for p in theta0]) for j in range(q)]
    for i, (a, b, p0) in enumerate(zip(net.parameters(), seq, theta0)):
        mag = p0.double().abs() + MU * z[-1][i].abs() + sum(abs(c) * z[j][i].abs() for j, c in enumerate(coeffs))
        assert ((a.detach().double() - b.double()).abs() <= (q + 4) * 2.0 ** -24 * mag).all()
    assert not all(torch.equal(a, b) for a, b in zip(theta0, seq))


def test_cons_matches_zobench_and_counts_queries():
    net, theta0, x, y, batches = setup()
    opt = ZOSGDCons(net.parameters(), lr=0.1, eps=MU, seed=SEED, backend=BACKEND)
    calls = [0]

    def counted(t):
        def closure():
            calls[0] += 1
            return F.cross_entropy(net(x[batches[t]]), y[batches[t]])
        return closure

    got = []
    for t in range(STEPS):
        opt.step(counted(t))
        got.append(["theta", "minus", "plus"].index(opt.last_choice))
    want, choices = cons64(theta0, x, y, batches, lr=0.1)
    assert calls[0] == STEPS * opt.queries_per_step == STEPS * 5
    assert got == choices and len(set(choices)) > 1          # the candidates really compete
    assert rel(net.parameters(), want) < 1e-6


@pytest.mark.parametrize("q", [1, 2])
def test_momentum_dense_matches_sgd_momentum(q):
    net, theta0, x, y, batches = setup()
    run(ZOSGDMomentum(net.parameters(), lr=LR, eps=MU, momentum=0.9, seed=SEED, state="dense", n_directions=q,
                      backend=BACKEND), net, x, y, batches)
    want = momentum64(theta0, x, y, batches, 0.9, q)
    assert rel(net.parameters(), want) < 1e-6
    assert rel(want, nspsa64(theta0, x, y, batches, q)) > 1e-3


def test_momentum_seeded_matches_its_truncated_definition():
    net, theta0, x, y, batches = setup()
    run(ZOSGDMomentum(net.parameters(), lr=LR, eps=MU, momentum=0.8, seed=SEED, state="seeded", window=6,
                      backend=BACKEND), net, x, y, batches)
    assert rel(net.parameters(), momentum64(theta0, x, y, batches, 0.8, window=6)) < 1e-6


def test_seeded_momentum_vs_dense_within_truncation_bound():
    """Linear loss f(θ) = <a, θ>: the SPSA scalars do not depend on θ, so dense and seeded modes see the
    same ĝ_t and their momenta differ exactly by the dropped tail, β^K·m_{t−K} (measured here)."""
    torch.manual_seed(3)
    shapes = [(40, 10), (40,)]
    a = [torch.randn(s, dtype=torch.float64) for s in shapes]
    beta, K, T = 0.9, 8, 30
    nets = {m: [torch.nn.Parameter(torch.zeros(s)) for s in shapes] for m in ("dense", "seeded")}
    opts = {m: ZOSGDMomentum(nets[m], lr=1e-3, eps=1e-2, momentum=beta, seed=5, state=m, window=K, backend=BACKEND)
            for m in nets}
    snap = None
    for t in range(T):
        for m, opt in opts.items():
            opt.step(lambda m=m: sum((ai * p.double()).sum() for ai, p in zip(a, nets[m])))
        if t == T - 1 - K:
            snap = [opts["dense"].state[p]["momentum_buffer"].double().clone() for p in nets["dense"]]
    dense_m = [opts["dense"].state[p]["momentum_buffer"].double() for p in nets["dense"]]
    hist = opts["seeded"]._history
    seeded_m = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for s, (ks, cs) in enumerate(hist):
        for k, c in zip(ks, cs[0]):
            for i, sh in enumerate(shapes):
                seeded_m[i] += beta ** (len(hist) - 1 - s) * c * zo_kernels.noise_(torch.empty(sh), k, i).double()
    err = torch.cat([(d - s).flatten() for d, s in zip(dense_m, seeded_m)]).norm().item()
    tail = torch.cat([x.flatten() for x in snap]).norm().item() * beta ** K
    full = torch.cat([x.flatten() for x in dense_m]).norm().item()
    assert opts["seeded"].truncation_bound() == beta ** K
    assert abs(err - tail) <= 1e-4 * tail + 1e-5 * full        # the dropped tail, and nothing else
    assert err > 0.05 * tail                                  # measurable: the test can fail


@pytest.mark.parametrize("decoupled", [False, True])
def test_zo_adam_matches_torch_adam_with_zo_grad(decoupled):
    net, theta0, x, y, batches = setup()
    wd = 0.05
    run(ZOAdam(net.parameters(), lr=LR, eps=MU, seed=SEED, weight_decay=wd, decoupled=decoupled, backend=BACKEND),
        net, x, y, batches)
    if decoupled:
        ps = [p.clone() for p in theta0]
        opt = torch.optim.AdamW(ps, lr=LR, weight_decay=wd)
        for t in range(STEPS):
            dz = spsa64(ps, x, y, batches[t], t, 1)
            for i, p in enumerate(ps):
                p.grad = dz[0][0] / MU * dz[0][1][i]
            opt.step()
        want = ps
    else:
        want = adam64(theta0, x, y, batches, wd=wd)
    assert rel(net.parameters(), want) < 1e-5
    assert rel(want, nspsa64(theta0, x, y, batches, 1)) > 1e-2


@pytest.mark.parametrize("backend", backends_on("cpu", "adam", reference=False))
def test_zo_adam_native_backends_track_the_reference(backend):
    runs = []
    for b in (BACKEND, backend):
        net, _, x, y, batches = setup()
        run(ZOAdam(net.parameters(), lr=LR, eps=MU, seed=SEED, backend=b, n_directions=2), net, x, y, batches,
            steps=5)
        runs.append([p.detach().clone() for p in net.parameters()])
    assert rel(runs[1], runs[0]) < 1e-5


@pytest.mark.parametrize("no_grad", [False, True])
def test_forward_grad_matches_backward_mode_directional_derivative(no_grad):
    net, theta0, x, y, batches = setup()
    with torch.no_grad() if no_grad else contextlib.nullcontext():     # the jvp works under no_grad too
        run(ForwardGrad(net, lr=LR, seed=SEED, weight_decay=0.1, backend=BACKEND), net, x, y, batches)
    assert rel(net.parameters(), forward_grad64(theta0, x, y, batches, wd=0.1)) < 1e-6


# ---------------------------------------------------------------------------- core features
def _make(kind, params, net=None, **kw):
    base = dict(lr=LR, seed=SEED, backend=BACKEND)
    if kind == "sign":
        return ZOSGDSign(params, eps=MU, n_directions=2, **base, **kw)
    if kind == "nspsa":
        return MeZO(params, eps=MU, n_directions=3, **base, **kw)
    if kind == "cons":
        return ZOSGDCons(params, eps=MU, **base, **kw)
    if kind == "mmt_dense":
        return ZOSGDMomentum(params, eps=MU, state="dense", **base, **kw)
    if kind == "mmt_seeded":
        return ZOSGDMomentum(params, eps=MU, state="seeded", window=4, **base, **kw)
    if kind == "adam":
        return ZOAdam(params, eps=MU, **base, **kw)
    if kind == "fwd":
        return ForwardGrad(net, **base, **kw)
    raise AssertionError(kind)


KINDS = ["sign", "nspsa", "cons", "mmt_dense", "mmt_seeded", "adam", "fwd"]


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resume_bit_identical(kind):
    net, _, x, y, batches = setup()
    opt = _make(kind, net.parameters(), net)
    run(opt, net, x, y, batches, steps=6)
    saved_w = copy.deepcopy(net.state_dict())
    saved_o = copy.deepcopy(opt.state_dict())
    run(opt, net, x, y, batches, steps=5, t0=6)
    straight = [p.detach().clone() for p in net.parameters()]
    net2 = make_net(1)
    net2.load_state_dict(saved_w)
    opt2 = _make(kind, net2.parameters(), net2)
    opt2.load_state_dict(saved_o)
    run(opt2, net2, x, y, batches, steps=5, t0=6)
    assert all(torch.equal(a, b) for a, b in zip(straight, net2.parameters()))


@pytest.mark.parametrize("kind", ["mmt_dense", "adam", "lozo_m"])
def test_bf16_dense_state_resume_bit_identical(kind):
    """bf16 weights keep float32 state across a state_dict round trip (torch.optim's load would cast it
    to the weights' dtype: the fused passes refuse that, and dense momentum would lose its bits)."""
    net, _, x, y, batches = setup()
    net = net.to(torch.bfloat16)

    def make(ps):
        return LOZOM(ps, lr=LR, eps=MU, nu=3, seed=SEED, backend=BACKEND) if kind == "lozo_m" else _make(kind, ps)

    def steps(opt, model, t0, n):
        for t in range(t0, t0 + n):
            idx = batches[t]
            opt.step(lambda: F.cross_entropy(model(x[idx].bfloat16()).float(), y[idx]))

    opt = make(net.parameters())
    steps(opt, net, 0, 4)
    saved_w, saved_o = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    steps(opt, net, 4, 3)
    net2 = make_net(1).to(torch.bfloat16)
    net2.load_state_dict(saved_w)
    opt2 = make(net2.parameters())
    opt2.load_state_dict(saved_o)
    assert all(v.dtype == torch.float32 for st in opt2.state.values() for v in st.values() if torch.is_tensor(v))
    steps(opt2, net2, 4, 3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


@pytest.mark.parametrize("kind", ["sign", "nspsa", "cons", "mmt_seeded", "fwd"])
def test_replay_bit_exact(kind):
    net, _, x, y, batches = setup()
    w0 = [p.detach().clone() for p in net.parameters()]
    opt = _make(kind, net.parameters(), net, record=True)
    run(opt, net, x, y, batches, steps=6)
    replay(w0, opt.trajectory, backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(w0, net.parameters()))


@pytest.mark.parametrize("kind", ["mmt_dense", "adam"])
def test_dense_state_refuses_record(kind):
    net = make_net()
    with pytest.raises(ValueError, match="record"):
        _make(kind, net.parameters(), net, record=True)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_raise_restores_and_skip_counts(kind):
    net, _, x, y, batches = setup()
    w0 = [p.detach().clone() for p in net.parameters()]
    opt = _make(kind, net.parameters(), net, snapshot=True) if kind != "fwd" else _make(kind, None, net)
    with pytest.raises(NonFiniteLossError):
        opt.step(lambda: torch.tensor(float("nan")) + net(x[:2]).sum() * 0)
    assert all(torch.equal(a, b) for a, b in zip(w0, net.parameters())) and opt.step_count == 0
    opt.nan_policy = "skip"
    assert math.isnan(opt.step(lambda: torch.tensor(float("inf")) + net(x[:2]).sum() * 0))
    assert opt.skipped_steps == 1 and opt.step_count == 0


@pytest.mark.parametrize("kind", ["sign", "nspsa", "cons", "mmt_seeded", "adam"])
def test_bf16_exact_restore_failed_step_bit_identical(kind):
    """bf16 weights, no snapshot: the perturbations are undone by exact restore (plane_bits=8)."""
    net, _, x, y, batches = setup()
    net = net.to(torch.bfloat16)
    w0 = [p.detach().clone() for p in net.parameters()]
    opt = _make(kind, net.parameters(), net, plane_bits=8)
    n = [0]

    def closure():
        n[0] += 1
        out = F.cross_entropy(net(x[batches[0]].bfloat16()).float(), y[batches[0]])
        return out if n[0] < opt.queries_per_step - (3 if kind == "cons" else 0) else out * float("nan")

    with pytest.raises(NonFiniteLossError):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(w0, net.parameters()))
    n[0] = -100
    opt.step(closure)
    assert not all(torch.equal(a, b) for a, b in zip(w0, net.parameters()))


def test_validation():
    net = make_net()
    with pytest.raises(ValueError, match="n_directions"):
        MeZO(net.parameters(), lr=1e-3, n_directions=0)
    with pytest.raises(ValueError, match="lookahead"):
        MeZO(net.parameters(), lr=1e-3, n_directions=2, lookahead=True)
    with pytest.raises(ValueError, match="state must be"):
        ZOSGDMomentum(net.parameters(), lr=1e-3, state="sparse")
    with pytest.raises(ValueError, match="window"):
        ZOSGDMomentum(net.parameters(), lr=1e-3, window=0)
    with pytest.raises(ValueError, match="betas"):
        ZOAdam(net.parameters(), lr=1e-3, betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="nn.Module"):
        ForwardGrad(net.parameters(), lr=1e-3)
    opt = ZOSGDMomentum(net.parameters(), lr=1e-3, state="seeded", window=3)
    other = ZOSGDMomentum(net.parameters(), lr=1e-3, state="seeded", window=5)
    with pytest.raises(ValueError, match="window"):
        other.load_state_dict(opt.state_dict())
