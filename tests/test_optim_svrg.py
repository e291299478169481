"""MeZO-SVRG against a plain-PyTorch transcription of Algorithm 1 (Gautam et al., ICML 2024).

Same conventions as test_optim_mezo.py: fp32 weights, float64 loss inside the test MLP, step
sizes that keep γ = 1 − ηλ exact in fp32, z materialised with zo_kernels.noise.normal.
"""
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zo_kernels.noise import normal, step_key
from zo_kernels.optim import MeZOSVRG, NonFiniteLossError, naive, replay

from optim_helpers import _one_thread, assert_same_weights, data, make_net, mlp, problem, rel, z_of  # noqa: F401 (_one_thread: autouse)

BACKEND = "reference"
LR1, LR2, WD, MU, SEED, STEPS = 2.0 ** -6, 2.0 ** -7, 2.0 ** -3, 1e-2, 11, 50


def run_opt(opt, net, x, y, batches, steps):
    losses = []
    for t in range(steps):
        idx = batches[t]
        full = (lambda: F.cross_entropy(net(x), y)) if opt.is_full_step else None
        losses.append(opt.step(lambda: F.cross_entropy(net(x[idx]), y[idx]), full_closure=full))
    return losses


def svrg_algorithm1(theta, x, y, batches, lr1, lr2, mu, q, wd, seed, steps):
    """naive.mezo_svrg (Algorithm 1) on the test MLP; batch None is the full batch."""
    def loss(ps, idx):
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        return F.cross_entropy(mlp(ps, xs), ys).item()

    return naive.mezo_svrg(theta, loss, batches, lr1=lr1, lr2=lr2, mu=mu, q=q, wd=wd, steps=steps,
                           noise=naive.noise_of(seed, [p.shape for p in theta]))


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("anchor", ["dense", "replay"])
@pytest.mark.parametrize("q,wd", [(2, 0.0), (5, WD)])
def test_svrg_matches_algorithm1(anchor, q, wd):
    x, y, batches, net, theta0 = problem()
    opt = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, eps=MU, q=q, seed=SEED, anchor=anchor,
                   weight_decay=wd, backend=BACKEND)
    losses = run_opt(opt, net, x, y, batches, STEPS)
    ref, ref_losses = svrg_algorithm1(theta0, x, y, batches, LR1, LR2, MU, q, wd, SEED, STEPS)
    assert rel(net.parameters(), theta0) > 0.05
    assert rel(net.parameters(), ref) < 1e-6
    for a, b in zip(losses, ref_losses):
        assert a == pytest.approx(b, rel=1e-5)


def test_transcription_detects_a_wrong_algorithm():
    """The comparison can fail: η1/η2 swapped, or MeZO's update, land far from the optimizer."""
    x, y, batches, net, theta0 = problem()
    opt = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, eps=MU, q=3, seed=SEED, backend=BACKEND)
    run_opt(opt, net, x, y, batches, 12)
    swapped, _ = svrg_algorithm1(theta0, x, y, batches, LR2, LR1, MU, 3, 0.0, SEED, 12)
    assert rel(net.parameters(), swapped) > 1e-3


def test_dense_and_replay_agree():
    x, y, batches = data()
    out = {}
    for anchor in ("dense", "replay"):
        net = make_net()
        opt = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, eps=MU, q=4, seed=SEED, anchor=anchor,
                       weight_decay=WD)
        run_opt(opt, net, x, y, batches, 30)
        out[anchor] = [p.detach().clone() for p in net.parameters()]
    assert rel(out["dense"], out["replay"]) < 1e-6
    assert rel(out["dense"], [p.detach() for p in make_net().parameters()]) > 0.01


def _spy_closure(net, x, y, idx, log):
    def closure():
        log.append(torch.cat([p.detach().flatten().clone() for p in net.parameters()]))
        return F.cross_entropy(net(x[idx]), y[idx])
    return closure


@pytest.mark.parametrize("anchor", ["dense", "replay"])
def test_same_z_at_theta_and_anchor(anchor):
    """The four minibatch evaluations sit at θ ± μz_t and θ̄ ± μz_t with ONE z_t (the published
    code drew a fresh seed for the θ̄ estimate); θ̄ is θ at the last full step."""
    x, y, batches = data()
    net = make_net()
    opt = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, eps=MU, q=4, seed=SEED, anchor=anchor,
                   backend=BACKEND)
    flat = lambda: torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    ptrs = [p.data_ptr() for p in net.parameters()]
    shapes = [p.shape for p in net.parameters()]
    bar = flat()
    opt.step(None, full_closure=lambda: F.cross_entropy(net(x), y))
    for t in (1, 2, 3):
        theta = flat()
        seen = []
        opt.step(_spy_closure(net, x, y, batches[t], seen))
        assert len(seen) == 4
        z = torch.cat([zi.flatten() for zi in z_of(SEED, t, shapes)])
        p1, p2, p3, p4 = seen
        for a, b, centre in ((p1, p2, theta), (p3, p4, bar)):
            assert torch.allclose((a - b) / (2 * MU), z, atol=2e-4)
            assert torch.allclose((a + b) / 2, centre, atol=1e-6)
        assert (theta - bar).norm() > 1e-3           # θ and θ̄ are different points
    # the closure saw the anchor through the same parameter objects, whose storages are back
    assert [p.data_ptr() for p in net.parameters()] == ptrs


class BigAllocations(TorchDispatchMode):
    """Records every tensor an op creates outside the closure whose numel >= threshold."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold
        self.paused = False
        self.big = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            outs = out if isinstance(out, (tuple, list)) else [out]
            for o in outs:
                if isinstance(o, torch.Tensor) and o.numel() >= self.threshold and not any(
                        isinstance(a, torch.Tensor) and a.data_ptr() == o.data_ptr() for a in args):
                    self.big.append((str(func), o.numel()))
        return out


@pytest.mark.parametrize("anchor,expect_copy", [("replay", False), ("dense", True)])
def test_replay_allocates_no_weight_sized_tensor(anchor, expect_copy):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 2))
    x = torch.randn(4, 128)
    y = torch.tensor([0, 1, 0, 1])
    opt = MeZOSVRG(net.parameters(), lr=1e-3, lr_full=1e-2, eps=1e-3, q=3, anchor=anchor)
    mode = BigAllocations(threshold=128 * 128 // 2)   # activations here are 4x128: far below

    def closure():
        mode.paused = True
        try:
            return F.cross_entropy(net(x), y)
        finally:
            mode.paused = False

    with mode:
        for _ in range(7):
            opt.step(closure, full_closure=closure)
    assert bool(mode.big) == expect_copy, mode.big
    assert opt.step_count == 7


def test_full_step_schedule_and_missing_full_closure():
    x, y, _ = data()
    net = make_net()
    opt = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, q=3)
    closure = lambda: F.cross_entropy(net(x), y)
    pattern = []
    for _ in range(6):
        pattern.append(opt.is_full_step)
        opt.step(closure, full_closure=closure if opt.is_full_step else None)
    assert pattern == [True, False, False, True, False, False] and opt.is_full_step
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="full_closure"):
        opt.step(closure)
    assert opt.step_count == 6
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    q1 = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, q=1)
    for _ in range(2):
        assert q1.is_full_step
        q1.step(full_closure=closure)


@pytest.mark.parametrize("anchor", ["dense", "replay"])
@pytest.mark.parametrize("bad", [1, 2, 3, 4])
def test_nan_in_minibatch_step(anchor, bad):
    x, y, _ = data()
    net = make_net()
    opt = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, eps=MU, q=3, anchor=anchor)
    good = lambda: F.cross_entropy(net(x), y)
    opt.step(good, full_closure=good)
    before = [p.detach().clone() for p in net.parameters()]
    ptrs = [p.data_ptr() for p in net.parameters()]
    n = {"k": 0}

    def closure():
        n["k"] += 1
        return good() * (float("inf") if n["k"] == bad else 1.0)

    with pytest.raises(NonFiniteLossError):
        opt.step(closure)
    assert [p.data_ptr() for p in net.parameters()] == ptrs      # storages swapped back
    for p, b in zip(net.parameters(), before):
        assert (p - b).abs().max() < 5e-7
    assert opt.step_count == 1
    opt.nan_policy = "skip"
    n["k"] = 0
    assert math.isnan(opt.step(closure))
    assert opt.step_count == 1 and opt.skipped_steps == 1
    opt.step(good)                                     # and it goes on
    assert opt.step_count == 2


def test_nan_in_full_step_is_retried_as_full_step():
    x, y, _ = data()
    net = make_net()
    opt = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, eps=MU, q=2, nan_policy="skip")
    before = [p.detach().clone() for p in net.parameters()]
    out = opt.step(None, full_closure=lambda: torch.tensor(float("nan")))
    assert math.isnan(out) and opt.step_count == 0 and opt.is_full_step
    assert rel(net.parameters(), before) < 1e-7
    with pytest.raises(ValueError, match="full_closure"):
        opt.step(lambda: F.cross_entropy(net(x), y))


@pytest.mark.parametrize("anchor", ["dense", "replay"])
def test_groups_frozen_and_tied_weights(anchor):
    """Per-group lr / lr_full, a frozen tensor (never moves, keeps its id) and a tied alias that
    the dense swap must move along with the tensor it aliases."""
    x, y, batches = data()
    net = make_net()
    w1, b1, w2, b2 = net.l1.weight, net.l1.bias, net.l2.weight, net.l2.bias
    b1.requires_grad_(False)
    alias = torch.nn.Parameter(w2.data)

    class Wrapper(torch.nn.Module):   # reads w2 through the alias: a tied-weights model
        def forward(self, xs):
            return mlp([w1, b1, alias, b2], xs)

    model = Wrapper()
    theta0 = [p.detach().clone() for p in (w1, b1, w2, b2)]
    opt = MeZOSVRG([{"params": [w1, b1, w2], "lr": LR2, "lr_full": LR1},
                    {"params": [alias, b2], "lr": LR2 / 2, "lr_full": LR1 / 2}],
                   lr=0.0, lr_full=0.0, eps=MU, q=3, seed=SEED, anchor=anchor, backend=BACKEND)
    for t in range(12):
        idx = batches[t]
        opt.step(lambda: F.cross_entropy(model(x[idx]), y[idx]),
                 full_closure=(lambda: F.cross_entropy(model(x), y)) if opt.is_full_step else None)
    assert torch.equal(b1, theta0[1])
    assert alias.data_ptr() == w2.data_ptr()
    # transcription with per-tensor rates; ids: w1 0, b1 1 (frozen), w2 2, alias 3 (tied), b2 4
    lr1s, lr2s, ids = [LR1, 0.0, LR1, LR1 / 2], [LR2, 0.0, LR2, LR2 / 2], [0, 1, 2, 4]
    k = lambda t: step_key(SEED, t)
    zs = lambda t: [normal(k(t), i, p.numel()).view(p.shape) * (0.0 if i == 1 else 1.0)
                    for i, p in zip(ids, theta0)]

    def c(ps, z, idx):
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        return (F.cross_entropy(mlp([p + MU * zi for p, zi in zip(ps, z)], xs), ys).item()
                - F.cross_entropy(mlp([p - MU * zi for p, zi in zip(ps, z)], xs), ys).item()) / (2 * MU)

    th = list(theta0)
    for t in range(12):
        z = zs(t)
        if t % 3 == 0:
            ca, za, bar = c(th, z, None), z, th
            th = [p - e * ca * zi for p, zi, e in zip(th, za, lr1s)]
        else:
            d = c(th, z, batches[t]) - c(bar, z, batches[t])
            th = [p - e * (d * zi + ca * zai) for p, zi, zai, e in zip(th, z, za, lr2s)]
    assert rel([w1, w2, b2], [th[0], th[2], th[3]]) < 1e-6
    assert rel([w1, w2, b2], [theta0[0], theta0[2], theta0[3]]) > 0.01


# ------------------------------------------------------------------ state, replay
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("anchor", ["dense", "replay"])
def test_state_dict_resume_bit_identical(anchor):
    x, y, batches = data()
    total, q = 11, 3

    def fresh(**kw):
        net = make_net()
        args = dict(lr=LR2, lr_full=LR1, eps=MU, q=q, seed=SEED, anchor=anchor, weight_decay=WD)
        args.update(kw)
        return net, MeZOSVRG(net.parameters(), **args)

    net_a, opt_a = fresh()
    run_opt(opt_a, net_a, x, y, batches, total)
    for stop in (1, 2, 3, 5):
        net_b, opt_b = fresh()
        run_opt(opt_b, net_b, x, y, batches, stop)
        sd = _roundtrip(opt_b.state_dict())
        weights = _roundtrip(net_b.state_dict())
        net_c, opt_c = fresh(lr=1.0, lr_full=1.0, eps=0.5, seed=5, q=q)
        net_c.load_state_dict(weights)
        opt_c.load_state_dict(sd)
        assert opt_c.step_count == stop and opt_c.seed == SEED
        for t in range(stop, total):
            idx = batches[t]
            full = (lambda: F.cross_entropy(net_c(x), y)) if opt_c.is_full_step else None
            opt_c.step(lambda: F.cross_entropy(net_c(x[idx]), y[idx]), full_closure=full)
        assert_same_weights(net_a.parameters(), net_c.parameters(), anchor, stop)


def test_state_dict_anchor_mode_mismatch():
    net = make_net()
    x, y, _ = data()
    f = lambda: F.cross_entropy(net(x), y)
    opt = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, anchor="dense")
    opt.step(f, full_closure=f)
    other = MeZOSVRG(net.parameters(), lr=LR2, lr_full=LR1, anchor="replay")
    with pytest.raises(ValueError, match="anchor"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("anchor", ["dense", "replay"])
def test_replay_bit_exact(anchor):
    x, y, batches, net, theta0 = problem()
    opt = MeZOSVRG([{"params": [net.l1.weight, net.l1.bias], "weight_decay": WD},
                    {"params": [net.l2.weight, net.l2.bias], "lr": LR2 / 2}],
                   lr=LR2, lr_full=LR1, eps=MU, q=3, seed=SEED, anchor=anchor, record=True)
    run_opt(opt, net, x, y, batches, 14)
    log = json.loads(json.dumps(opt.trajectory))
    rebuilt = [p.clone() for p in theta0]
    replay(rebuilt, log)
    assert_same_weights(net.parameters(), rebuilt)


def test_validation():
    ps = list(make_net().parameters())
    with pytest.raises(ValueError, match="q"):
        MeZOSVRG(ps, lr=0.1, lr_full=0.1, q=0)
    with pytest.raises(TypeError, match="q"):
        MeZOSVRG(ps, lr=0.1, lr_full=0.1, q=2.0)
    with pytest.raises(ValueError, match="lr_full"):
        MeZOSVRG(ps, lr=0.1, lr_full=-1.0)
    with pytest.raises(ValueError, match="anchor"):
        MeZOSVRG(ps, lr=0.1, lr_full=0.1, anchor="sparse")
    with pytest.raises(ValueError, match="eps"):
        MeZOSVRG(ps, lr=0.1, lr_full=0.1, eps=-1e-3)
