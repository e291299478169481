"""ZOAdam(state="seeded", window=K): no weight-sized state (±1 noise: v is a scalar per group, m rebuilt from
the last K keys).  Against torch.optim.Adam in float64 with p.grad = ĝ (naive.adam) while the window holds
every step, against a float64 truncated-window transcription after; one pass per update; resume and replay
bit-identical; what it refuses."""
import copy

import pytest
import torch
import torch.nn.functional as F

import zo_kernels
from zo_kernels.optim import ZOAdam, naive, replay
from zo_kernels.optim.spsa import direction_key

from optim_helpers import _one_thread, data, gpu_backends, make_net, mlp, rel, run_steps  # noqa: F401 (autouse)

BACKEND = "reference"
LR, MU, SEED, STEPS, BETAS, EPS = 1e-2, 1e-2, 5, 8, (0.9, 0.99), 1e-8


def signs(t, shapes):
    return [zo_kernels.noise_(torch.empty(s), direction_key(SEED, t, 0), i, backend=BACKEND, noise="rademacher")
            .double() for i, s in enumerate(shapes)]


def setup(seed=0):
    x, y, batches = data(steps=30)
    net = make_net(seed)
    return net, [p.detach().clone().double() for p in net.parameters()], x, y, batches


def make(params, **kw):
    return ZOAdam(params, **dict(dict(lr=LR, eps=MU, seed=SEED, betas=BETAS, adam_eps=EPS, state="seeded",
                                      window=64, noise="rademacher", backend=BACKEND), **kw))


def loss_of(x, y):
    return lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item()


def truncated64(theta, loss, batches, steps, window, wd=0.0):
    """Adam with g = c·s, v a scalar, m the last `window` terms only: the seeded definition in float64."""
    hist, v = [], 0.0
    b1, b2 = BETAS
    for t in range(steps):
        s = signs(t, [p.shape for p in theta])
        lp = loss([p + MU * si for p, si in zip(theta, s)], batches[t])
        lm = loss([p - MU * si for p, si in zip(theta, s)], batches[t])
        c = (lp - lm) / (2 * MU)
        hist = (hist + [(c, s)])[-window:]
        v = b2 * v + (1 - b2) * c * c
        k = t + 1
        m = [(1 - b1) * sum(b1 ** (len(hist) - 1 - j) * cj * sj[i] for j, (cj, sj) in enumerate(hist))
             for i in range(len(theta))]
        denom = (v / (1 - b2 ** k)) ** 0.5 + EPS
        theta = [(1 - LR * wd) * p - LR / (1 - b1 ** k) * mi / denom for p, mi in zip(theta, m)]
    return theta


def test_matches_torch_adam_while_the_window_holds_every_step():
    net, theta0, x, y, batches = setup()
    opt = make(net.parameters())
    run_steps(opt, net, x, y, batches, STEPS)
    want = naive.adam(theta0, loss_of(x, y), batches, lr=LR, mu=MU, steps=STEPS, betas=BETAS, eps=EPS,
                      noise=lambda t, j: signs(t, [p.shape for p in theta0]))
    assert rel(net.parameters(), want) < 1e-6
    assert rel(want, theta0) > 1e-3
    assert not opt.state or all(not st for st in opt.state.values())     # no tensor state at all


# Here on the reference, and on a GPU with its kernels' fused Adam pass (pytest -m cuda, scripts/gpu_check.sh).
@pytest.mark.parametrize("backend,device", [pytest.param(BACKEND, "cpu", id="reference-cpu")] + gpu_backends())
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_truncated_window_matches_its_float64_definition(wd, backend, device):
    net, theta0, x, y, batches = setup()
    net = net.to(device)
    opt = make(net.parameters(), window=3, weight_decay=wd, decoupled=True, backend=backend)
    run_steps(opt, net, x.to(device), y.to(device), batches, STEPS)
    want = truncated64(theta0, loss_of(x, y), batches, STEPS, 3, wd)
    assert rel(net.parameters(), want) < 1e-6
    assert rel(want, truncated64(theta0, loss_of(x, y), batches, STEPS, 64, wd)) > 1e-4   # K matters
    assert opt.truncation_bound() == pytest.approx(0.9 ** 3)


def test_one_update_pass_of_the_window_keys():
    net, _, x, y, batches = setup()
    opt = make(net.parameters(), window=3, record=True)
    run_steps(opt, net, x, y, batches, 5)
    last = opt.trajectory[-1]
    assert sorted(last["keys"]) == sorted({direction_key(SEED, t, 0) for t in (2, 3, 4)})
    assert [r["step"] for r in opt.trajectory].count(4) == 3      # +μs, −2μs, then ONE update pass


def test_state_dict_resume_bit_identical():
    net, _, x, y, batches = setup()
    opt = make(net.parameters(), window=3)
    run_steps(opt, net, x, y, batches, 4)
    saved_w, saved_o = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    run_steps(opt, net, x, y, batches, 3, 4)
    net2 = make_net(1)
    net2.load_state_dict(saved_w)
    opt2 = make(net2.parameters(), window=3)
    opt2.load_state_dict(saved_o)
    run_steps(opt2, net2, x, y, batches, 3, 4)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    with pytest.raises(ValueError, match="window"):
        make(make_net(1).parameters(), window=4).load_state_dict(saved_o)


def test_replay_bit_identical():
    net, _, x, y, batches = setup()
    start = [p.detach().clone() for p in net.parameters()]
    opt = make(net.parameters(), window=3, record=True)
    run_steps(opt, net, x, y, batches, 5)
    ps = [torch.nn.Parameter(p.clone()) for p in start]
    replay(ps, opt.trajectory, backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(ps, net.parameters()))


def test_refusals():
    ps = make_net(0).parameters
    with pytest.raises(ValueError, match="needs noise='rademacher'"):
        make(ps(), noise="gaussian")
    with pytest.raises(ValueError, match="one direction"):
        make(ps(), n_directions=2)
    with pytest.raises(ValueError, match="window must be"):
        make(ps(), window=0)
    with pytest.raises(ValueError, match="record=True"):
        ZOAdam(ps(), lr=LR, record=True)
    with pytest.raises(ValueError, match="decoupled=True"):
        make(ps(), weight_decay=0.1)                         # coupled L2
    net, _, x, y, batches = setup()
    opt = make([{"params": list(net.parameters()), "weight_decay": 0.1}])   # a group's own coupled L2
    with pytest.raises(ValueError, match="decoupled=True"):
        run_steps(opt, net, x, y, batches, 1)
