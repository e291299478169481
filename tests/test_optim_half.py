"""Half-precision ZO training: exact restore, stochastic rounding of updates, drift vs float64."""
import copy
import math

import pytest
import torch

from zo_kernels.optim import MeZO, MeZOSVRG, replay

torch.set_num_threads(1)


def _weights(dtype, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(n, generator=g) * 0.02).to(dtype))


def _quadratic(w, target):
    return lambda: ((w.double() - target) ** 2).mean() * 100


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", ["mezo", "svrg-dense", "svrg-replay"])
def test_zero_lr_exact_restore_drifts_far_less_than_fused(dtype, cls):
    def run(restore, plane_bits=2):
        w = _weights(dtype)
        w0 = w.detach().clone()
        closure = _quadratic(w, torch.zeros(()))
        if cls == "mezo":
            opt = MeZO([w], lr=0.0, restore=restore, plane_bits=plane_bits)
        else:
            opt = MeZOSVRG([w], lr=0.0, lr_full=0.0, q=3, anchor=cls.split("-")[1], restore=restore,
                           plane_bits=plane_bits)
        for _ in range(30):
            opt.step(closure, closure) if cls != "mezo" else opt.step(closure)
        return _rel(w.detach(), w0), (w.detach() == w0).double().mean().item()

    fused, _ = run("fused")
    exact2, _ = run("auto")
    exact8, frac8 = run("exact", 8)
    assert fused > 1e-3                  # the naive restore really drifts
    assert exact2 < fused / 20
    assert exact8 < fused / 200
    assert frac8 > 0.999


def test_float32_defaults_to_fused_and_half_to_exact():
    w32 = _weights(torch.float32)
    w16 = _weights(torch.bfloat16)
    assert not MeZO([w32], lr=0.1)._exact_active([w32])
    assert MeZO([w16], lr=0.1)._exact_active([w16])
    assert not MeZO([w16], lr=0.1, lookahead=True)._exact_active([w16])
    with pytest.raises(ValueError, match="lookahead"):
        MeZO([w16], lr=0.1, lookahead=True, restore="exact")
    with pytest.raises(ValueError, match="plane_bits"):
        MeZO([w16], lr=0.1, plane_bits=3)
    with pytest.raises(ValueError, match="restore"):
        MeZO([w16], lr=0.1, restore="magic")


@pytest.mark.parametrize("cls", ["mezo", "svrg-dense", "svrg-replay"])
def test_bf16_run_tracks_float64_run(cls):
    """Same seeds in float64 (reference backend, float64 math) are the truth; bf16 stays within a few
    bf16 ulps per step of it, and exact restore keeps it closer than the fused restore."""
    target = torch.linspace(-0.05, 0.05, 4096, dtype=torch.float64)

    def run(dtype, restore="auto"):
        w = _weights(dtype)
        closure = _quadratic(w, target)
        kw = dict(restore=restore) if dtype != torch.float64 else {}
        if cls == "mezo":
            opt = MeZO([w], lr=2e-4, **kw)
        else:
            opt = MeZOSVRG([w], lr=1e-4, lr_full=2e-4, q=2, anchor=cls.split("-")[1], **kw)
        for _ in range(10):
            opt.step(closure, closure) if cls != "mezo" else opt.step(closure)
        return w.detach().double()

    truth = run(torch.float64)
    start = _weights(torch.float64).detach()
    moved = (truth - start).norm().item()
    exact = (run(torch.bfloat16) - truth).norm().item()
    fused = (run(torch.bfloat16, "fused") - truth).norm().item()
    assert moved > 0
    # 10 steps of one rounding per pass: a handful of half-ulps of 0.02-sized weights per element.
    assert exact < 3e-4 * math.sqrt(4096) * 10 ** 0.5
    assert exact < fused


def test_stochastic_rounding_keeps_sub_ulp_updates_in_expectation():
    """Updates far below half an ulp vanish with nearest rounding and survive on average with
    stochastic rounding, matching the float64 run's mean movement."""
    def run(dtype, rounding):
        w = torch.nn.Parameter(torch.full((8192,), 1.0, dtype=dtype))
        closure = lambda: (w.double().sum() - 8192 * 2.0) ** 2 / 8192**2  # pulls every weight up
        opt = MeZO([w], lr=2e-4, rounding=rounding, restore="exact" if dtype != torch.float64 else "auto")
        for _ in range(20):
            opt.step(closure)
        return (w.detach().double() - 1.0).mean().item()

    truth = run(torch.float64, "nearest")
    near = run(torch.bfloat16, "nearest")
    sr = run(torch.bfloat16, "stochastic")
    ulp = 2.0**-7
    assert abs(truth) < ulp / 4                   # every single update is sub-ulp
    assert abs(near) < abs(truth) / 10            # nearest rounding loses them
    assert abs(sr - truth) < 0.25 * abs(truth) + 6 * ulp / math.sqrt(8192)


@pytest.mark.parametrize("cls", ["mezo", "svrg-dense", "svrg-replay"])
def test_exact_mode_replay_and_state_dict_are_bit_exact(cls):
    def make(w):
        if cls == "mezo":
            return MeZO([w], lr=1e-3, record=True, rounding="stochastic")
        return MeZOSVRG([w], lr=1e-3, lr_full=2e-3, q=2, anchor=cls.split("-")[1], record=True,
                        rounding="stochastic")

    target = torch.linspace(-0.05, 0.05, 1024, dtype=torch.float64)
    w = _weights(torch.bfloat16, 1024)
    w0 = w.detach().clone()
    opt = make(w)
    closure = _quadratic(w, target)
    for _ in range(5):
        opt.step(closure, closure) if cls != "mezo" else opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())  # the live dict shares the anchor buffers
    mid = w.detach().clone()
    for _ in range(5):
        opt.step(closure, closure) if cls != "mezo" else opt.step(closure)
    final = w.detach().clone()
    assert any("undo" in r for r in opt.trajectory)

    r = torch.nn.Parameter(w0.clone())
    replay([r], opt.trajectory)
    assert torch.equal(r.detach(), final)

    w2 = torch.nn.Parameter(mid.clone())
    opt2 = make(w2)
    opt2.load_state_dict(sd)
    closure2 = _quadratic(w2, target)
    for _ in range(5):
        opt2.step(closure2, closure2) if cls != "mezo" else opt2.step(closure2)
    assert torch.equal(w2.detach(), final)
