"""LossRatioAnnealing (MeZO-SVRG paper, Algorithm 4) against a transcription; bookkeeping helpers."""
import io
import math

import pytest
import torch

from zo_kernels.optim import LossRatioAnnealing, MeZO, MeZOSVRG
from zo_kernels.optim.points import Move, Point, plan_move


def alg4_lrs(losses, w, kappa, alpha, lr0):
    """Algorithm 4: after every epoch of w losses, compare its mean with the previous epoch's."""
    lr, out = lr0, []
    for i in range(len(losses)):
        n = i + 1
        if n % w == 0 and n >= 2 * w:
            cur = sum(losses[n - w:n]) / w
            prev = sum(losses[n - 2 * w:n - w]) / w
            if cur / prev > kappa:
                lr /= alpha
        out.append(lr)
    return out


def _losses(seed=0, n=60):
    g = torch.Generator().manual_seed(seed)
    # a noisy curve that goes down, then up twice (so annealing fires), then down again
    base = torch.cat([torch.linspace(2, 1, 20), torch.linspace(1, 1.5, 15), torch.linspace(1.5, 0.5, 25)])
    return (base[:n] * (1 + 0.05 * torch.randn(n, generator=g))).tolist()


@pytest.mark.parametrize("w", [3, 5])
def test_annealing_matches_algorithm4(w):
    losses = _losses()
    ps = [torch.nn.Parameter(torch.zeros(3))]
    opt = MeZOSVRG([{"params": ps}], lr=1e-3, lr_full=1e-2, q=2)
    sched = LossRatioAnnealing(opt, steps_per_epoch=w, kappa=1.05, alpha=5)
    got, got_full = [], []
    for loss in losses:
        sched.step(loss)
        got.append(opt.param_groups[0]["lr"])
        got_full.append(opt.param_groups[0]["lr_full"])
    want = alg4_lrs(losses, w, 1.05, 5, 1e-3)
    assert got == pytest.approx(want, rel=1e-12)
    assert got_full == pytest.approx([x * 10 for x in want], rel=1e-12)
    assert 1 <= sched.num_anneals == round(math.log(1e-3 / want[-1], 5))


def test_annealing_all_groups_and_no_anneal_when_decreasing():
    ps = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = MeZO([{"params": ps[:1], "lr": 1.0}, {"params": ps[1:], "lr": 0.5}], lr=1.0)
    sched = LossRatioAnnealing(opt, steps_per_epoch=2, kappa=1.05, alpha=4)
    for loss in [3, 3, 2, 2, 1, 1]:
        assert not sched.step(torch.tensor(float(loss)))
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    assert not sched.step(1.2)
    assert sched.step(1.2)                # epoch mean 1.2 / 1.0 > 1.05
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.125]


def test_annealing_state_dict_midway():
    losses = _losses(seed=1)
    ps = [torch.nn.Parameter(torch.zeros(3))]

    def run(split):
        opt = MeZO(ps, lr=1e-2)
        sched = LossRatioAnnealing(opt, steps_per_epoch=4)
        lrs = []
        for i, loss in enumerate(losses):
            if i == split:
                buf = io.BytesIO()
                torch.save((opt.param_groups[0]["lr"], sched.state_dict()), buf)
                buf.seek(0)
                lr, state = torch.load(buf, weights_only=True)
                opt = MeZO(ps, lr=lr)
                sched = LossRatioAnnealing(opt, steps_per_epoch=99, kappa=9.0, alpha=2)
                sched.load_state_dict(state)
            sched.step(loss)
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    assert run(None) == run(13) == run(24)
    assert run(None)[-1] < 1e-2


def test_annealing_validation():
    opt = MeZO([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError):
        LossRatioAnnealing(opt, steps_per_epoch=0)
    with pytest.raises(ValueError):
        LossRatioAnnealing(opt, steps_per_epoch=2, kappa=-1)
    with pytest.raises(ValueError):
        LossRatioAnnealing(opt, steps_per_epoch=2, alpha=0)


def test_move_args_algebra():
    """x = a·base + Σ c_k z_k: the move gamma, alphas reproduce the target for random vectors."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, generator=g, dtype=torch.float64)
    z = {k: torch.randn(5, generator=g, dtype=torch.float64) for k in (11, 22, 33)}
    val = lambda lin: lin.a * base + sum((v * z[k] for k, v in lin.c.items()), torch.zeros(5, dtype=torch.float64))
    cur = Point(0.97, [(11, 0.3), (22, -1e-3)])
    tgt = Point(0.95, [(22, 2e-3), (33, 0.7)])
    move = plan_move(cur, tgt)
    moved = move.gamma * val(cur) + sum(a * z[k] for k, a in move.pairs)
    assert torch.allclose(moved, val(tgt), rtol=0, atol=1e-14)
    assert plan_move(tgt, tgt) == Move(1.0, ())
    assert plan_move(Point(1.0, [(1, 0.5)]), Point(1.0, [(1, -0.5)])) == Move(1.0, ((1, -1.0),))
