"""MeZO against plain-PyTorch transcriptions of the paper (z materialised with zo_kernels.noise.normal).

Tolerances: weights within 1e-6 relative (norm over all parameters) after 50 fp32 steps.  The
loss is computed in float64 inside the test MLP so that loss round-off, divided by 2μ, does not
swamp the comparison; the step sizes keep γ = 1 − ηλ exact in fp32 (η = 2^-7, λ = 2^-3), since
the primitive applies γ in fp32 (README, Optimizers: "weight decay and fp32 γ").
"""
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

import zo_kernels.optim.noise_path as zo_base
from zo_kernels.optim import MeZO, NonFiniteLossError, naive, replay

from optim_helpers import Net, _one_thread, assert_same_weights, data, make_net, mlp, problem, rel, run_steps, z_of  # noqa: F401 (_one_thread: autouse)

BACKEND = "reference"       # the transcription uses the reference's z: compare the algorithm, not backends
LR, WD, MU, SEED, STEPS = 2.0 ** -7, 2.0 ** -3, 1e-2, 7, 50


def run_opt(opt, net, x, y, batches, steps=STEPS):
    return run_steps(opt, net, x, y, batches, steps)


# ------------------------------------------------------------------ transcriptions (zo_kernels.optim.naive)
def loss_of(x, y):
    return lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item()


def mezo_algorithm1(theta, x, y, batches, lr, mu, wd, seed, steps=STEPS, lrs=None, mus=None, wds=None, ids=None):
    """naive.mezo on the test MLP (MeZO paper, Algorithm 1; per-tensor lrs / mus / wds, None = frozen)."""
    return naive.mezo(theta, loss_of(x, y), batches, lr=lr, mu=mu, wd=wd, steps=steps, lrs=lrs, mus=mus, wds=wds,
                      noise=naive.noise_of(seed, [p.shape for p in theta], ids))


def mezo_code_style(theta, x, y, batches, lr, mu, wd, seed, steps=STEPS):
    """naive.mezo_published_step, MeZO's published step (perturb +1, −2, +1; θ ← θ − η(g z + λθ)), on fp32 clones."""
    theta = [p.clone() for p in theta]
    noise = naive.noise_of(seed, [p.shape for p in theta])
    for t in range(steps):
        idx = batches[t]
        naive.mezo_published_step(theta, noise(t), lambda: F.cross_entropy(mlp(theta, x[idx]), y[idx]).item(),
                                  lr=lr, mu=mu, wd=wd)
    return theta


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("lookahead", [False, True])
def test_mezo_matches_algorithm1_and_published_update(lookahead):
    x, y, batches, net, theta0 = problem()
    opt = MeZO(net.parameters(), lr=LR, eps=MU, weight_decay=WD, seed=SEED, lookahead=lookahead, backend=BACKEND)
    losses = run_opt(opt, net, x, y, batches)
    opt.settle()
    ref, ref_losses = mezo_algorithm1(theta0, x, y, batches, LR, MU, WD, SEED)
    assert rel(net.parameters(), theta0) > 0.1           # the weights did move
    assert rel(net.parameters(), ref) < 1e-6
    assert rel(net.parameters(), mezo_code_style(theta0, x, y, batches, LR, MU, WD, SEED)) < 1e-6
    # step() returns (l+ + l−)/2 of the batch at θ_t
    for a, b in zip(losses, ref_losses):
        assert a == pytest.approx(b, rel=1e-5)


def test_mezo_weight_decay_is_applied():
    """A transcription without λθ must be far away: the comparison above can fail."""
    x, y, batches, net, theta0 = problem()
    opt = MeZO(net.parameters(), lr=LR, eps=MU, weight_decay=WD, seed=SEED, backend=BACKEND)
    run_opt(opt, net, x, y, batches, steps=10)
    no_wd, _ = mezo_algorithm1(theta0, x, y, batches, LR, MU, 0.0, SEED, steps=10)
    other_seed, _ = mezo_algorithm1(theta0, x, y, batches, LR, MU, WD, SEED + 1, steps=10)
    assert rel(net.parameters(), no_wd) > 1e-3
    assert rel(net.parameters(), other_seed) > 1e-2


class CallCounter:
    def __init__(self, monkeypatch):
        self.calls = []
        real = zo_base.noise_axpy_

        def counting(params, keys, alphas, **kw):
            self.calls.append((len(params), len(keys), kw.get("gamma", 1.0)))
            return real(params, keys, alphas, **kw)

        monkeypatch.setattr(zo_base, "noise_axpy_", counting)


@pytest.mark.parametrize("lookahead,per_step", [(False, 3), (True, 2)])
def test_passes_per_step(monkeypatch, lookahead, per_step):
    """Perturb, perturb, restore+update: each one fused call over all tensors (lookahead: 2 calls)."""
    x, y, batches = data()
    net = make_net()
    counter = CallCounter(monkeypatch)
    opt = MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, lookahead=lookahead)
    run_opt(opt, net, x, y, batches, steps=5)
    n_first = 1 if lookahead else 0       # lookahead: the first step perturbs separately
    assert len(counter.calls) == 5 * per_step + n_first
    assert all(n == 4 for n, _, _ in counter.calls)
    if lookahead:
        assert [k for _, k, _ in counter.calls[1:]] == [1, 2] * 5   # update pass carries z_t and z_{t+1}


def test_param_groups_frozen_and_tied(monkeypatch):
    """Groups with their own lr / eps / weight decay, a frozen tensor, and a tied (aliased) tensor."""
    x, y, batches = data()
    net = make_net()
    w1, b1, w2, b2 = net.l1.weight, net.l1.bias, net.l2.weight, net.l2.bias
    b1.requires_grad_(False)                              # frozen: id 1 is kept, never moves
    alias = torch.nn.Parameter(w2.data)                   # tied: the same storage as w2
    theta0 = [p.detach().clone() for p in (w1, b1, w2, b2)]
    groups = [{"params": [w1, b1], "lr": LR, "eps": MU, "weight_decay": WD},
              {"params": [w2, alias, b2], "lr": LR / 2, "eps": 2 * MU, "weight_decay": 0.0}]
    counter = CallCounter(monkeypatch)
    opt = MeZO(groups, lr=1.0, seed=SEED, backend=BACKEND)
    steps = 20
    run_opt(opt, net, x, y, batches, steps=steps)
    assert torch.equal(b1, theta0[1])
    assert alias.data_ptr() == w2.data_ptr()
    # tensor ids: w1 0, b1 1 (frozen), w2 2, alias 3 (skipped: tied to w2), b2 4
    ref, _ = mezo_algorithm1(theta0, x, y, batches, None, None, None, SEED, steps=steps,
                             lrs=[LR, None, LR / 2, LR / 2], mus=[MU, 1.0, 2 * MU, 2 * MU],
                             wds=[WD, 0.0, 0.0, 0.0], ids=[0, 1, 2, 4])
    assert rel([w1, w2, b2], [ref[0], ref[2], ref[3]]) < 1e-6
    assert rel([w1, w2, b2], [theta0[0], theta0[2], theta0[3]]) > 0.05
    # different eps per group: every pass is one call per group (2 groups × 3 passes)
    assert len(counter.calls) == steps * 6
    assert sorted(n for n, _, _ in counter.calls[:6]) == [1, 1, 1, 2, 2, 2]


def test_same_coefficients_share_one_call(monkeypatch):
    net = make_net()
    x, y, batches = data()
    groups = [{"params": [net.l1.weight, net.l1.bias], "lr": LR},
              {"params": [net.l2.weight, net.l2.bias], "lr": LR / 4}]
    counter = CallCounter(monkeypatch)
    opt = MeZO(groups, lr=LR, eps=MU, seed=SEED)
    run_opt(opt, net, x, y, batches, steps=2)
    # per step: +μ and −2μ over all 4 tensors in one call each; the update differs per group
    assert [n for n, _, _ in counter.calls] == [4, 4, 2, 2] * 2


def _nan_closure(net, x, y, bad_calls):
    count = {"n": 0}

    def closure():
        count["n"] += 1
        loss = F.cross_entropy(net(x), y)
        return loss * float("nan") if count["n"] in bad_calls else loss

    return closure


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("bad_call", [1, 2])
def test_nan_raise_restores(lookahead, bad_call):
    x, y, _ = data()
    net = make_net()
    opt = MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, lookahead=lookahead)
    opt.step(lambda: F.cross_entropy(net(x), y))
    opt.settle()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        opt.step(_nan_closure(net, x, y, {bad_call}))
    assert opt.step_count == 1
    assert not opt.is_perturbed
    for p, b in zip(net.parameters(), before):
        # +μz −2μz +μz in fp32 is θ up to a couple of roundings
        assert (p - b).abs().max() < 2e-7


def test_nan_skip_leaves_theta_and_counter():
    x, y, _ = data()
    net = make_net()
    opt = MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, nan_policy="skip")
    before = [p.detach().clone() for p in net.parameters()]
    out = opt.step(_nan_closure(net, x, y, {2}))
    assert math.isnan(out)
    assert opt.step_count == 0 and opt.skipped_steps == 1
    assert rel(net.parameters(), before) < 1e-7
    # the next step works and is step 0 again (same key)
    opt.step(lambda: F.cross_entropy(net(x), y))
    assert opt.step_count == 1 and rel(net.parameters(), before) > 1e-4


def test_closure_exception_restores():
    x, y, _ = data()
    net = make_net()
    opt = MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED)
    before = [p.detach().clone() for p in net.parameters()]
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("boom")
        return F.cross_entropy(net(x), y)

    with pytest.raises(KeyError):
        opt.step(closure)
    assert rel(net.parameters(), before) < 1e-7 and opt.step_count == 0


def test_closure_with_grad_and_tensor_return():
    net = make_net()
    x, y, _ = data()
    opt = MeZO(net.parameters(), lr=LR, eps=MU)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return F.cross_entropy(net(x), y)

    out = opt.step(closure)
    assert isinstance(out, float) and seen == [False, False]
    assert all(p.grad is None for p in net.parameters())


# --------------------------------------------------------------- state and replay
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("stop", [1, 4, 9])
def test_state_dict_resume_bit_identical(lookahead, stop):
    x, y, batches = data()
    total = 12

    def fresh():
        net = make_net()
        return net, MeZO(net.parameters(), lr=LR, eps=MU, weight_decay=WD, seed=SEED, lookahead=lookahead)

    net_a, opt_a = fresh()
    for t in range(total):
        if t == stop:
            opt_a.settle()          # lookahead: what state_dict() does at `stop` (no-op otherwise)
        idx = batches[t]
        opt_a.step(lambda: F.cross_entropy(net_a(x[idx]), y[idx]))
    opt_a.settle()

    net_b, opt_b = fresh()
    for t in range(stop):
        idx = batches[t]
        opt_b.step(lambda: F.cross_entropy(net_b(x[idx]), y[idx]))
    sd = _roundtrip(opt_b.state_dict())
    weights = _roundtrip(net_b.state_dict())
    assert not opt_b.is_perturbed

    torch.manual_seed(123)
    net_c = Net()
    net_c.load_state_dict(weights)
    opt_c = MeZO(net_c.parameters(), lr=0.5, eps=0.1, weight_decay=0.0, seed=99, lookahead=lookahead)
    opt_c.load_state_dict(sd)
    assert opt_c.step_count == stop and opt_c.seed == SEED and opt_c.param_groups[0]["lr"] == LR
    for t in range(stop, total):
        idx = batches[t]
        opt_c.step(lambda: F.cross_entropy(net_c(x[idx]), y[idx]))
    opt_c.settle()
    assert_same_weights(net_a.parameters(), net_c.parameters())


@pytest.mark.parametrize("lookahead", [False, True])
def test_replay_bit_exact(lookahead):
    x, y, batches, net, theta0 = problem()
    groups = [{"params": [net.l1.weight, net.l1.bias], "weight_decay": WD},
              {"params": [net.l2.weight, net.l2.bias], "lr": LR / 3}]
    opt = MeZO(groups, lr=LR, eps=MU, seed=SEED, lookahead=lookahead, record=True)
    run_opt(opt, net, x, y, batches, steps=15)
    opt.settle()
    log = json.loads(json.dumps(opt.trajectory))        # plain data: survives JSON
    assert all(set(r) >= {"step", "keys", "alphas", "gamma", "tensor_ids"} for r in log)
    rebuilt = [p.clone() for p in theta0]
    replay(rebuilt, log)
    assert_same_weights(net.parameters(), rebuilt)
    # a log with one coefficient changed by one ulp does not rebuild the same bits
    bad = [dict(r) for r in log]
    bad[-1]["alphas"] = [math.nextafter(a, math.inf) for a in bad[-1]["alphas"]]
    bad[-1]["alphas"][0] *= 1.0 + 1e-6
    other = [p.clone() for p in theta0]
    replay(other, bad)
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), other))


def test_replay_after_resume_and_module_params():
    x, y, batches, net, theta0 = problem()
    opt = MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, record=True)
    run_opt(opt, net, x, y, batches, steps=5)
    sd = _roundtrip(opt.state_dict())
    opt2 = MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED)
    opt2.load_state_dict(sd)
    for t in range(5, 9):
        idx = batches[t]
        opt2.step(lambda: F.cross_entropy(net(x[idx]), y[idx]))
    other = make_net()
    with torch.no_grad():
        for p, t0 in zip(other.parameters(), theta0):
            p.copy_(t0)
    replay(other, opt2.trajectory)
    assert_same_weights(net.parameters(), other.parameters())


# ------------------------------------------------------------------- lookahead
def test_lookahead_weights_between_steps_and_guards():
    x, y, _, net, theta0 = problem()
    opt = MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, lookahead=True, backend=BACKEND)
    opt.step(lambda: F.cross_entropy(net(x), y))
    assert opt.is_perturbed
    # independently: θ1 from Algorithm 1, then the weights must be θ1 + μ z_1
    th1, _ = mezo_algorithm1(theta0, x, y, [torch.arange(len(x))], LR, MU, 0.0, SEED, steps=1)
    z1 = z_of(SEED, 1, [p.shape for p in theta0])
    assert rel(net.parameters(), [a + MU * b for a, b in zip(th1, z1)]) < 1e-6
    assert rel(net.parameters(), th1) > 1e-3
    with opt.settled():
        assert not opt.is_perturbed
        assert rel(net.parameters(), th1) < 1e-6
    # a watched module settles itself before a forward pass outside step()
    opt.step(lambda: F.cross_entropy(net(x), y))
    handle = opt.watch(net)
    net(x)
    assert not opt.is_perturbed
    handle.remove()
    opt.step(lambda: F.cross_entropy(net(x), y))
    handle = opt.watch(net, action="raise")
    with pytest.raises(RuntimeError, match="perturbed"):
        net(x)
    opt.step(lambda: F.cross_entropy(net(x), y))       # the hook does not fire inside step
    handle.remove()
    opt.eval()                                           # the HF Trainer's hook
    assert not opt.is_perturbed


# ------------------------------------------------------------------ validation
def test_validation_errors():
    net = make_net()
    ps = list(net.parameters())
    with pytest.raises(ValueError, match="lr"):
        MeZO(ps, lr=-1.0)
    with pytest.raises(ValueError, match="eps"):
        MeZO(ps, lr=0.1, eps=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        MeZO(ps, lr=0.1, weight_decay=-0.1)
    with pytest.raises(ValueError, match="seed"):
        MeZO(ps, lr=0.1, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        MeZO(ps, lr=0.1, seed=2 ** 64)
    with pytest.raises(TypeError, match="seed"):
        MeZO(ps, lr=0.1, seed=1.5)
    with pytest.raises(ValueError, match="empty"):
        MeZO([], lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        MeZO([ps[0] * 2], lr=0.1)
    with pytest.raises(ValueError, match="rounding"):
        MeZO(ps, lr=0.1, rounding="up")
    with pytest.raises(ValueError, match="nan_policy"):
        MeZO(ps, lr=0.1, nan_policy="ignore")
    with pytest.raises(ValueError, match="lr"):
        MeZO([{"params": ps[:2], "lr": float("nan")}], lr=0.1)
    opt = MeZO(ps, lr=0.1, seed=2 ** 64 - 1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    for p in ps:
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        opt.step(lambda: torch.tensor(0.0))
