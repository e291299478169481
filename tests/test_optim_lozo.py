"""LOZO and LOZO-M against independent float64 transcriptions of the authors' update (optsuite/LOZO,
LOZOtrainer: `lowrank_zo_step`, `lowrank_zo_update`, `lowrank_zo_update_momentum`), with U and V
materialised from the spec's low-rank noise; lazy sampling, state_dict resume, replay, NaN policy,
exact restore, data parallel."""
import math

import pytest
import torch
import torch.nn.functional as F

from zo_kernels.noise import step_key
from zo_kernels.optim import LOZO, LOZOM, NonFiniteLossError, naive, replay

from optim_helpers import _one_thread, assert_same_weights, data, make_net, mlp, problem, rel, run_steps  # noqa: F401 (_one_thread: autouse)

BACKEND = "reference"
LR, WD, MU, SEED, STEPS, RANK, NU = 2.0 ** -7, 2.0 ** -3, 1e-2, 7, 30, 2, 4


def run_opt(opt, net, x, y, batches, steps=STEPS, start=0):
    return run_steps(opt, net, x, y, batches, steps, start)


def lozo_transcription(theta, x, y, batches, beta=None, steps=STEPS, seed=SEED, r=RANK, nu=NU):
    """naive.lozo, the authors' loop in float64 (LOZO, or LOZO-M with beta), on the test MLP."""
    return naive.lozo(theta, lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item(), batches, lr=LR, mu=MU,
                      wd=WD, seed=seed, rank=r, nu=nu, beta=beta, steps=steps)


@pytest.mark.parametrize("beta", [None, 0.9])
def test_matches_float64_transcription_of_the_authors_update(beta):
    x, y, batches, net, theta0 = problem()
    kw = dict(lr=LR, eps=MU, rank=RANK, nu=NU, weight_decay=WD, seed=SEED, backend=BACKEND)
    opt = LOZO(net.parameters(), **kw) if beta is None else LOZOM(net.parameters(), beta=beta, **kw)
    run_opt(opt, net, x, y, batches)
    want = lozo_transcription(theta0, x, y, batches, beta=beta)
    assert rel(list(net.parameters()), want) < 1e-5
    assert rel(want, theta0) > 1e-3          # it moved: the comparison is not vacuous


def test_cpu_backend_tracks_the_reference():
    x, y, batches = data()
    nets = [make_net(), make_net()]
    for net, b in zip(nets, ("reference", "cpu")):
        run_opt(LOZOM(net.parameters(), lr=LR, eps=MU, rank=RANK, nu=NU, seed=SEED, backend=b), net, x, y, batches)
    assert rel(list(nets[1].parameters()), list(nets[0].parameters())) < 1e-4


def test_v_changes_exactly_every_nu_steps():
    net = make_net()
    opt = LOZO(net.parameters(), lr=LR, rank=RANK, nu=5, seed=3)
    keys = [opt.period_key(t) for t in range(16)]
    assert [keys[t] == keys[t - 1] for t in range(1, 16)] == [t % 5 != 0 for t in range(1, 16)]
    assert keys[0] == step_key(3, 0) and keys[5] == step_key(3, 5) and keys[15] == step_key(3, 15)
    # and the passes use it: a recorded step carries its period's key_v
    x, y, batches = data()
    opt = LOZO(net.parameters(), lr=LR, rank=RANK, nu=5, seed=3, record=True)
    run_opt(opt, net, x, y, batches, steps=7)
    assert {(r["step"], r["key_v"]) for r in opt.trajectory} == {(t, keys[t]) for t in range(7)}


@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_state_dict_resume_mid_period_is_bit_identical(cls):
    x, y, batches = data()
    kw = dict(lr=LR, eps=MU, rank=RANK, nu=NU, weight_decay=WD, seed=SEED)
    net_a = make_net()
    opt_a = cls(net_a.parameters(), **kw)
    run_opt(opt_a, net_a, x, y, batches, steps=10)
    net_b = make_net()
    opt_b = cls(net_b.parameters(), **kw)
    run_opt(opt_b, net_b, x, y, batches, steps=6)             # 6 % 4 = 2: mid-period
    buf = __import__("io").BytesIO()
    torch.save({"opt": opt_b.state_dict(), "net": net_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net_c = make_net(seed=1)
    net_c.load_state_dict(saved["net"])
    opt_c = cls(net_c.parameters(), **kw)
    opt_c.load_state_dict(saved["opt"])
    run_opt(opt_c, net_c, x, y, batches, steps=4, start=6)
    assert_same_weights(net_a.parameters(), net_c.parameters())


def test_replay_is_bit_identical():
    x, y, batches, net, theta0 = problem()
    opt = LOZO(net.parameters(), lr=LR, eps=MU, rank=RANK, nu=NU, weight_decay=WD, seed=SEED, record=True)
    run_opt(opt, net, x, y, batches, steps=9)
    replay(theta0, opt.trajectory)
    assert_same_weights(theta0, net.parameters())


@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_non_finite_loss_restores_and_skips(cls):
    net = make_net()
    theta0 = [p.detach().clone() for p in net.parameters()]
    opt = cls(net.parameters(), lr=LR, eps=MU, rank=RANK, nu=NU, nan_policy="raise")
    with pytest.raises(NonFiniteLossError):
        opt.step(lambda: torch.tensor(float("nan")))
    assert opt.step_count == 0
    assert rel(list(net.parameters()), theta0) < 1e-6
    opt = cls(net.parameters(), lr=LR, eps=MU, rank=RANK, nu=NU, nan_policy="skip")
    assert math.isnan(opt.step(lambda: torch.tensor(float("inf"))))
    assert opt.skipped_steps == 1 and opt.step_count == 0


@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_bf16_exact_restore_keeps_the_step_clean(cls):
    """With lr = 0 a bf16 step must leave the weights bit-identical (exact restore), where the
    fused +μ −2μ +μ round trip would not."""
    net = make_net().to(torch.bfloat16)
    theta0 = [p.detach().clone() for p in net.parameters()]
    x, y, batches = data()
    opt = cls(net.parameters(), lr=0.0, eps=1e-3, rank=4, nu=2, seed=1, plane_bits=8)
    run_opt(opt, net, x.to(torch.bfloat16), y, batches, steps=5)
    assert_same_weights(net.parameters(), theta0)
    fused = make_net().to(torch.bfloat16)
    opt = cls(fused.parameters(), lr=0.0, eps=1e-3, rank=4, nu=2, seed=1, restore="fused")
    run_opt(opt, fused, x.to(torch.bfloat16), y, batches, steps=5)
    assert any(not torch.equal(a, b) for a, b in zip(fused.parameters(), theta0))


def test_bad_arguments():
    net = make_net()
    with pytest.raises(ValueError, match="rank"):
        LOZO(net.parameters(), lr=1e-3, rank=0)
    with pytest.raises(ValueError, match="nu"):
        LOZO(net.parameters(), lr=1e-3, nu=0)
    with pytest.raises(ValueError, match="beta"):
        LOZOM(net.parameters(), lr=1e-3, beta=1.0)
    with pytest.raises(ValueError, match="record"):
        LOZOM(net.parameters(), lr=1e-3, record=True)
    opt = LOZO(net.parameters(), lr=1e-3, rank=2)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="rank"):
        LOZO(net.parameters(), lr=1e-3, rank=3).load_state_dict(sd)
