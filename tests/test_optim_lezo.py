"""Layer sampling (LeZO) on the SPSA optimizers, layer_fraction=ρ: which tensors a step touches (drawn
from the step key as spsa.py's docstring specifies), MeZO against the float64 transcription
naive.lezo, ρ = 1 bit-identical to no sampling, replay and resume exact, and the refusals."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from zo_kernels.noise import mix_keys, step_key
from zo_kernels.optim import FZOO, MeZO, ZOAdam, ZOSGDMomentum, ZOSGDSign, naive, replay

from optim_helpers import _one_thread, data, make_net, mlp, rel, run_steps, z_of  # noqa: F401 (autouse)

BACKEND = "reference"
LR, MU, SEED, STEPS = 2.0 ** -7, 1e-2, 11, 12
LAY = 0x4C4159          # the tag of the draw (docs: spsa.py, "Layer sampling")


def kept(t, rho, ids=range(4), seed=SEED):
    """The spec's draw: the ⌈ρ·n⌉ ids with the smallest mix_keys(LAY, step_key(seed, t), id)."""
    k = max(1, math.ceil(rho * len(ids) - 1e-9))
    return set(sorted(ids, key=lambda i: mix_keys(LAY, step_key(seed, t), i))[:k])


def mezo(net, **kw):
    return MeZO(net.parameters(), lr=LR, eps=MU, seed=SEED, backend=BACKEND, **kw)


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75])
def test_mezo_matches_transcription(rho):
    x, y, batches = data(steps=40)
    net = make_net(0)
    theta0 = [p.detach().clone().double() for p in net.parameters()]
    run_steps(mezo(net, layer_fraction=rho, weight_decay=0.1), net, x, y, batches, STEPS)
    want, _ = naive.lezo(theta0, lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item(), batches, lr=LR,
                         mu=MU, wd=0.1, steps=STEPS, keep=lambda t: kept(t, rho),
                         noise=lambda t: [z.double() for z in z_of(SEED, t, [p.shape for p in theta0])])
    assert rel(net.parameters(), want) < 1e-6
    full, _ = naive.mezo(theta0, lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item(), batches, lr=LR,
                         mu=MU, wd=0.1, steps=STEPS,
                         noise=lambda t: [z.double() for z in z_of(SEED, t, [p.shape for p in theta0])])
    assert rel(want, full) > 1e-3         # sampling matters: the test can fail


@pytest.mark.parametrize("make", [
    lambda net, **kw: mezo(net, **kw),
    lambda net, **kw: mezo(net, n_directions=3, **kw),
    lambda net, **kw: ZOSGDSign(net.parameters(), lr=LR, eps=MU, seed=SEED, backend=BACKEND, **kw),
    lambda net, **kw: FZOO(net.parameters(), lr=LR, eps=MU, seed=SEED, n_directions=3, backend=BACKEND, **kw),
], ids=["mezo", "nspsa", "sign", "fzoo"])
def test_passes_touch_only_the_draw(make):
    """Every pass of step t names exactly the drawn tensors; the others stay bit-identical all step."""
    x, y, batches = data(steps=40)
    net = make_net(0)
    opt = make(net, layer_fraction=0.5, record=True)
    ps = list(net.parameters())
    for t in range(6):
        before = weights(net)
        drawn = kept(t, 0.5)

        def closure():
            assert all(torch.equal(ps[i], before[i]) for i in range(4) if i not in drawn)
            return F.cross_entropy(net(x[batches[t]]), y[batches[t]])

        n = len(opt.trajectory)
        opt.step(closure)
        recs = opt.trajectory[n:]
        assert recs and all(sorted(r["tensor_ids"]) == sorted(drawn) for r in recs)
        assert all(torch.equal(ps[i], before[i]) for i in range(4) if i not in drawn)
        assert all(not torch.equal(ps[i], before[i]) for i in drawn)


def test_draw_changes_and_covers_every_tensor():
    draws = [frozenset(kept(t, 0.5)) for t in range(20)]
    assert len(set(draws)) > 1 and set().union(*draws) == {0, 1, 2, 3}
    assert all(len(d) == 2 for d in draws)
    assert len(kept(0, 0.01)) == 1 and len(kept(0, 0.3)) == 2 and len(kept(0, 1.0)) == 4
    assert len(kept(0, 0.1, ids=range(30))) == 3            # ρ·n = 3.0000000000000004 stays 3


@pytest.mark.parametrize("kw", [{}, {"n_directions": 2}])
def test_rho_one_is_no_sampling_bit_for_bit(kw):
    x, y, batches = data(steps=40)
    runs = []
    for extra in ({}, {"layer_fraction": 1.0}, {"layer_fraction": 1}):
        net = make_net(0)
        opt = mezo(net, record=True, **kw, **extra)
        run_steps(opt, net, x, y, batches, 5)
        runs.append((weights(net), opt.trajectory))
    for w, traj in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], w)) and traj == runs[0][1]


def test_replay_and_resume_exact():
    x, y, batches = data(steps=40)
    net = make_net(0)
    start = weights(net)
    opt = mezo(net, layer_fraction=0.5, record=True)
    run_steps(opt, net, x, y, batches, 4)
    saved_w, saved_o = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    run_steps(opt, net, x, y, batches, 4, 4)
    ps = [torch.nn.Parameter(p.clone()) for p in start]
    replay(ps, opt.trajectory, backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(ps, net.parameters()))
    net2 = make_net(1)
    net2.load_state_dict(saved_w)
    opt2 = mezo(net2, layer_fraction=0.5, record=True)
    opt2.load_state_dict(saved_o)
    run_steps(opt2, net2, x, y, batches, 4, 4)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    with pytest.raises(ValueError, match="layer_fraction"):
        mezo(make_net(1), layer_fraction=0.75).load_state_dict(saved_o)


def test_frozen_tensors_keep_their_ids_and_are_never_drawn():
    x, y, batches = data(steps=40)
    net = make_net(0)
    net.l1.bias.requires_grad_(False)
    opt = mezo(net, layer_fraction=0.5, record=True)
    for t in range(5):
        n = len(opt.trajectory)
        run_steps(opt, net, x, y, batches, 1, t)
        assert {i for r in opt.trajectory[n:] for i in r["tensor_ids"]} == kept(t, 0.5, ids=[0, 2, 3])


def test_refusals():
    net = make_net(0)
    for bad in (0, 0.0, 1.5, -0.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="layer_fraction must be a number in \\(0, 1\\]"):
            mezo(net, layer_fraction=bad)
    with pytest.raises(ValueError, match="lookahead"):
        mezo(net, lookahead=True, layer_fraction=0.5)
    with pytest.raises(ValueError, match="ZOAdam keeps per-tensor state"):
        ZOAdam(net.parameters(), lr=LR, layer_fraction=0.5)
    with pytest.raises(ValueError, match="ZOSGDMomentum keeps per-tensor state"):
        ZOSGDMomentum(net.parameters(), lr=LR, layer_fraction=0.5)
