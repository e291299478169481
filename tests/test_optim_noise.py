"""The noise= option of every ZO optimizer: "gaussian" given explicitly is the default bit for bit (the
ops are called as before: no noise keyword, no trajectory field); "rademacher" (±1) against the float64
transcriptions with the reference's sign noise; recorded for replay; checked on load; refused by LOZO."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from zo_kernels.noise import rademacher
from zo_kernels.optim import (
    FZOO,
    LOZO,
    LOZOM,
    ForwardGrad,
    MeZO,
    MeZOSVRG,
    ZOAdam,
    ZOSGDCons,
    ZOSGDMomentum,
    ZOSGDSign,
    naive,
    replay,
)
from zo_kernels.optim.spsa import direction_key

from optim_helpers import _one_thread, data, make_net, mlp, rel, run_steps  # noqa: F401 (_one_thread: autouse)

BACKEND = "reference"
LR, MU, SEED, STEPS = 2.0 ** -7, 1e-2, 11, 8


def make(kind, net, **kw):
    base = {"lr": LR, "seed": SEED, "backend": BACKEND, **kw}
    ps = net.parameters()
    return {
        "mezo": lambda: MeZO(ps, eps=MU, **base),
        "mezo-lookahead": lambda: MeZO(ps, eps=MU, lookahead=True, **base),
        "nspsa": lambda: MeZO(ps, eps=MU, n_directions=3, **base),
        "svrg": lambda: MeZOSVRG(ps, lr_full=LR, eps=MU, q=2, **base),
        "lozo": lambda: LOZO(ps, eps=MU, rank=2, nu=3, **base),
        "lozom": lambda: LOZOM(ps, eps=MU, rank=2, nu=3, **base),
        "sign": lambda: ZOSGDSign(ps, eps=MU, n_directions=2, **base),
        "cons": lambda: ZOSGDCons(ps, eps=MU, **base),
        "mmt_dense": lambda: ZOSGDMomentum(ps, eps=MU, state="dense", **base),
        "mmt_seeded": lambda: ZOSGDMomentum(ps, eps=MU, state="seeded", window=4, **base),
        "adam": lambda: ZOAdam(ps, eps=MU, **base),
        "fwd": lambda: ForwardGrad(net, **base),
        "fzoo": lambda: FZOO(ps, eps=MU, n_directions=3, **base),
    }[kind]()


def steps(opt, net, n=STEPS):
    x, y, batches = data(steps=40)
    if isinstance(opt, MeZOSVRG):
        for t in range(n):
            idx = batches[t]
            opt.step(lambda: F.cross_entropy(net(x[idx]), y[idx]),
                     full_closure=(lambda: F.cross_entropy(net(x), y)) if opt.is_full_step else None)
    else:
        run_steps(opt, net, x, y, batches, n)
    return [p.detach().clone() for p in net.parameters()]


KINDS = ["mezo", "mezo-lookahead", "nspsa", "svrg", "lozo", "lozom", "sign", "cons", "mmt_dense", "mmt_seeded",
         "adam", "fwd", "fzoo"]
RECORDABLE = {"mezo", "mezo-lookahead", "nspsa", "svrg", "lozo", "sign", "cons", "mmt_seeded", "fwd", "fzoo"}


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_default_is_bit_identical(kind):
    """Every optimizer's default form given explicitly changes nothing: weights and trajectory (FZOO's
    default is ±1; a Gaussian run's records carry no noise field, as before the option existed)."""
    default = "rademacher" if kind == "fzoo" else "gaussian"
    out = []
    for kw in ({}, {"noise": default}):
        net = make_net(0)
        rec = {"record": True} if kind in RECORDABLE else {}
        opt = make(kind, net, **kw, **rec)
        out.append((steps(opt, net), opt.trajectory, opt.noise))
    (a, ta, na), (b, tb, nb) = out
    assert na == nb == default
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert ta == tb
    if ta and default == "gaussian":
        assert all("noise" not in r for r in ta)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_form_refused(kind):
    with pytest.raises(ValueError, match="noise must be one of .*'uniform'"):
        make(kind, make_net(0), noise="uniform")


@pytest.mark.parametrize("kind", ["lozo", "lozom"])
def test_lozo_refuses_rademacher(kind):
    with pytest.raises(ValueError, match="Gaussian factors"):
        make(kind, make_net(0), noise="rademacher")


# ------------------------------------------------------------------------- ±1 against the transcriptions
def zs(t, j, shapes):
    """±1 of direction j of step t, from the reference's sign noise (float64)."""
    k = direction_key(SEED, t, j)
    return [rademacher(k, i, math.prod(s), dtype=torch.float64).view(s) for i, s in enumerate(shapes)]


def transcription(kind, theta, x, y, batches):
    loss = lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]).item()  # noqa: E731
    noise = lambda t, j: zs(t, j, [p.shape for p in theta])  # noqa: E731
    kw = dict(lr=LR, noise=noise, steps=STEPS)
    if kind == "mezo":
        return naive.mezo(theta, loss, batches, mu=MU, lr=LR, steps=STEPS, noise=lambda t: noise(t, 0))[0]
    if kind == "nspsa":
        return naive.n_spsa(theta, loss, batches, mu=MU, q=3, **kw)
    if kind == "sign":
        return naive.sign_sgd(theta, loss, batches, mu=MU, q=2, **kw)
    if kind == "mmt_dense":
        return naive.momentum_sgd(theta, loss, batches, mu=MU, beta=0.9, **kw)
    if kind == "adam":
        return naive.adam(theta, loss, batches, mu=MU, **kw)
    if kind == "fwd":
        return naive.forward_grad(theta, lambda ps, idx: F.cross_entropy(mlp(ps, x[idx]), y[idx]), batches, **kw)
    if kind == "fzoo":
        return naive.fzoo(theta, loss, batches, mu=MU, n=3, **kw)[0]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["mezo", "nspsa", "sign", "mmt_dense", "adam", "fwd", "fzoo"])
def test_rademacher_matches_transcription(kind):
    x, y, batches = data(steps=40)
    net = make_net(0)
    theta0 = [p.detach().clone().double() for p in net.parameters()]
    got = steps(make(kind, net, noise="rademacher"), net)
    want = transcription(kind, theta0, x, y, batches)
    assert rel(got, want) < (1e-5 if kind == "adam" else 1e-6)
    assert rel(want, theta0) > 1e-4          # it moved


@pytest.mark.parametrize("kind", ["mezo", "mezo-lookahead", "svrg", "sign", "cons", "fzoo"])
def test_rademacher_replays_bit_identically(kind):
    net = make_net(0)
    start = [p.detach().clone() for p in net.parameters()]
    opt = make(kind, net, noise="rademacher", record=True)
    got = steps(opt, net)
    if kind == "mezo-lookahead":
        opt.settle()
        got = [p.detach().clone() for p in net.parameters()]
    assert all(r["noise"] == "rademacher" for r in opt.trajectory)
    ps = [torch.nn.Parameter(p.clone()) for p in start]
    replay(ps, opt.trajectory, backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(ps, got))
    g = [torch.nn.Parameter(p.clone()) for p in start]
    replay(g, [{k: v for k, v in r.items() if k != "noise"} for r in opt.trajectory], backend=BACKEND)
    assert not all(torch.equal(a, b) for a, b in zip(g, got))     # the form matters to replay


def test_state_dict_carries_the_form():
    net = make_net(0)
    opt = make("sign", net, noise="rademacher")
    steps(opt, net, 2)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["zo"]["noise"] == "rademacher"
    with pytest.raises(ValueError, match="noise='rademacher'"):
        make("sign", make_net(0)).load_state_dict(sd)
    other = make("sign", make_net(0), noise="rademacher")
    other.load_state_dict(sd)
    assert other.step_count == 2
    old = copy.deepcopy(make("sign", make_net(0)).state_dict())
    del old["zo"]["noise"]                  # saved before the option existed: Gaussian
    make("sign", make_net(0)).load_state_dict(old)
    with pytest.raises(ValueError, match="noise='gaussian'"):
        make("sign", make_net(0), noise="rademacher").load_state_dict(old)


@pytest.mark.parametrize("kind", ["mezo", "mezo-lookahead", "nspsa", "sign", "cons", "mmt_seeded", "adam", "fzoo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rademacher_same_bits_on_reference_and_cpu(kind, dtype):
    """±1 noise is integer-exact, and the CPU kernel does the reference's IEEE operations in the reference's
    order (no fused multiply-add), so a whole ±1 run gives the same bits on both backends: fp32, and bf16
    with exact restore and nearest rounding (docs/spec.md §9).  Not ZO-Adam: its update's divide and
    square root are the backends' own (the reference computes them with torch ops), so there the two
    agree to within an ulp or so, not bit for bit."""
    from zo_kernels import backends
    if "cpu" not in backends.available_backends():
        pytest.skip("the C++ CPU backend is not built")
    out = []
    for backend in ("reference", "cpu"):
        net = make_net(0).to(dtype)
        out.append(steps(make(kind, net, noise="rademacher", backend=backend), net))
    for a, b in zip(*out):
        if kind == "adam":
            torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -20 if dtype == torch.float32 else 2 ** -7,
                                       atol=1e-7)
        else:
            assert torch.equal(a.view(torch.int16) if dtype == torch.bfloat16 else a,
                               b.view(torch.int16) if dtype == torch.bfloat16 else b), kind
