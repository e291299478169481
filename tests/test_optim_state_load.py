"""load_state_dict refuses another optimizer's state, or state that does not fit the parameters,
before changing anything: the optimizer's state_dict is the same before and after the refused load,
and its next step is the step an optimizer that never saw the bad state takes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from zo_kernels.optim import LOZO, LOZOM, MeZO, MeZOSVRG, ZOAdam, ZOSGDMomentum

from optim_helpers import Net, _one_thread  # noqa: F401 (autouse)

MAKERS = {
    "mezo": lambda ps: MeZO(ps, lr=1e-3, seed=1),
    "zo-adam": lambda ps: ZOAdam(ps, lr=1e-3, seed=1),
    "lozo": lambda ps: LOZO(ps, lr=1e-3, rank=2, nu=3, seed=1),
    "lozo-m": lambda ps: LOZOM(ps, lr=1e-3, rank=2, nu=3, seed=1),
    "mmt-dense": lambda ps: ZOSGDMomentum(ps, lr=1e-3, state="dense", seed=1),
    "svrg": lambda ps: MeZOSVRG(ps, lr=1e-3, lr_full=1e-3, q=2, anchor="dense", seed=1),
}


def _trained(kind, steps=3):
    """(net, optimizer, closure) after a few steps, so that tensor state exists."""
    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(32, 10), torch.randint(0, 4, (32,))
    f = lambda: F.cross_entropy(net(x).float(), y)  # noqa: E731
    opt = MAKERS[kind](list(net.parameters()))
    for _ in range(steps):
        opt.step(f, full_closure=f) if kind == "svrg" else opt.step(f)
    return net, opt, f


def _same(a, b) -> bool:
    """Deep equality of two state_dicts (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _refused(opt, sd, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    assert _same(opt.state_dict(), before)


@pytest.mark.parametrize("src,dst", [("mezo", "zo-adam"), ("lozo", "mezo"), ("zo-adam", "mezo"),
                                     ("mmt-dense", "zo-adam"), ("lozo-m", "lozo"), ("svrg", "mezo")])
def test_another_optimizers_state_is_refused_and_changes_nothing(src, dst):
    _, other, _ = _trained(src)
    net, opt, f = _trained(dst)
    _refused(opt, other.state_dict(), f"saved by {type(other).__name__}")
    opt.step(f)                         # the optimizer still works (ZOAdam used to fail on 'betas')


def test_refused_load_then_step_matches_an_untouched_optimizer():
    _, other, _ = _trained("mezo")
    net, opt, f = _trained("zo-adam")
    net2, opt2, f2 = _trained("zo-adam")
    sd = other.state_dict()
    sd["zo"]["kind"] = "ZOAdam"         # passes the class check: the groups lack 'betas'
    _refused(opt, sd, "betas")
    opt.step(f)
    opt2.step(f2)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind,key", [("zo-adam", "exp_avg"), ("mmt-dense", "momentum_buffer"),
                                      ("lozo-m", "momentum"), ("svrg", "anchor")])
def test_state_tensor_of_wrong_shape_or_dtype_is_refused(kind, key):
    net, opt, f = _trained(kind)
    good = opt.state_dict()
    idx = next(i for i, st in good["state"].items() if key in st)
    for bad_value, match in ((good["state"][idx][key][..., :1].clone(), "shape"),
                             (good["state"][idx][key].double(), "float64"),
                             ("text", "tensor")):
        sd = copy.deepcopy(good)
        sd["state"][idx][key] = bad_value
        _refused(opt, sd, match)
    opt.load_state_dict(good)           # the same state, untouched, loads


def test_unknown_state_key_parameter_index_and_half_entries_are_refused():
    net, opt, f = _trained("zo-adam")
    good = opt.state_dict()
    sd = copy.deepcopy(good)
    sd["state"][0]["momentum_buffer"] = sd["state"][0]["exp_avg"].clone()
    _refused(opt, sd, "keeps 'exp_avg', 'exp_avg_sq'")
    sd = copy.deepcopy(good)
    sd["state"][99] = dict(sd["state"][0])
    _refused(opt, sd, "no parameter")
    sd = copy.deepcopy(good)
    del sd["state"][0]["exp_avg_sq"]
    _refused(opt, sd, "exp_avg_sq")
    sd = copy.deepcopy(good)
    sd["param_groups"][0]["lr"] = "fast"
    _refused(opt, sd, "finite number")
    sd = copy.deepcopy(good)
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:2]
    _refused(opt, sd, "parameters")
    sd = copy.deepcopy(good)
    sd["zo"]["seed"] = -1
    _refused(opt, sd, "seed")


def test_class_specific_refusal_after_the_common_checks_changes_nothing():
    """ZOSGDMomentum checks its window after the base class has loaded the step count: the
    all-or-nothing wrapper puts everything back."""
    _, small, _ = _trained("mmt-dense")
    torch.manual_seed(0)
    net = Net()
    opt = ZOSGDMomentum(list(net.parameters()), lr=1e-3, state="dense", window=small.window + 1, seed=1)
    _refused(opt, small.state_dict(), "window")


def test_meta_state_is_refused():
    net, opt, f = _trained("zo-adam")
    sd = copy.deepcopy(opt.state_dict())   # state_dict()'s entries are the optimizer's own dicts
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to("meta")
    _refused(opt, sd, "data")           # a meta tensor has no numbers to load
