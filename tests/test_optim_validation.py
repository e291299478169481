"""Optimizer construction and steps refuse bad input with a clear error (issue 12, item 4)."""
import pytest
import torch

from zo_kernels.optim import MeZO, MeZOSVRG

from optim_helpers import _one_thread  # noqa: F401 (autouse)


def _make(cls, params, **kw):
    if cls is MeZOSVRG:
        kw.setdefault("lr_full", 1e-3)
    return cls(params, lr=1e-3, **kw)


@pytest.mark.parametrize("cls", [MeZO, MeZOSVRG])
def test_float64_with_exact_restore_refused_at_construction(cls):
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*float64.*restore='exact'"):
        _make(cls, [p], restore="exact")
    before = p.detach().clone()
    opt = _make(cls, [p])                       # restore="auto": float64 takes the fused path
    closure = lambda: (p ** 2).sum()            # noqa: E731
    if cls is MeZOSVRG:
        opt.step(full_closure=closure)
    else:
        opt.step(closure)
    assert not torch.equal(p, before)


def test_float64_beside_bf16_in_one_group_steps_fused():
    a = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = MeZO([a, b], lr=1e-3)
    opt.step(lambda: (a ** 2).sum() + (b.double() ** 2).sum())
    assert opt.step_count == 1


@pytest.mark.parametrize("cls", [MeZO, MeZOSVRG])
def test_sparse_parameter_is_named_sparse(cls):
    s = torch.zeros(6)
    s[1] = 1.0
    p = torch.nn.Parameter(s.to_sparse())
    with pytest.raises(TypeError, match="sparse"):
        _make(cls, [p])


def test_svrg_closure_that_edits_param_groups():
    """Popping a parameter inside a closure used to raise KeyError(<address>) mid-step (dense anchor).
    Now the step finishes on the layout it started with, and the next step says what changed."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6)) for _ in range(3)]
    opt = MeZOSVRG(ps, lr=1e-3, lr_full=1e-3, q=3, anchor="dense")
    loss = lambda: sum((p.double() ** 2).sum() for p in ps)       # noqa: E731
    opt.step(full_closure=loss)

    def popping():
        if len(opt.param_groups[0]["params"]) == 3:
            opt.param_groups[0]["params"].pop()
        return loss()

    opt.step(popping)                 # step 1, a minibatch step: the closure pops, the step finishes
    assert opt.step_count == 2
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="set of trainable tensors changed"):
        opt.step(loss)                # step 2, a minibatch step on a different set of tensors
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
