"""The optimizers' smaller bad-input cases (issue 27): what a closure may return, numpy seeds, only
empty parameters, and an fp16/bf16 update that overflows the weights' range."""
import numpy as np
import pytest
import torch

from zo_kernels.noise import step_key
from zo_kernels.optim import MeZO, NonFiniteLossError

from optim_helpers import _one_thread  # noqa: F401 (autouse)


def _w():
    return torch.nn.Parameter(torch.linspace(-1, 1, 8))


@pytest.mark.parametrize("ret,match", [(None, "forget to `return`"), ("0.5", "got str"), (True, "got bool"),
                                       (torch.tensor(1 + 2j), "complex64"), (torch.tensor(True), "torch.bool"),
                                       ((None, 4), "got None")])
def test_closure_return_of_the_wrong_type_is_refused_and_the_weights_stay(ret, match):
    w = _w()
    before = w.detach().clone()
    opt = MeZO([w], lr=1e-2, snapshot=True)
    with pytest.raises(TypeError, match=match):
        opt.step(lambda: ret)
    assert torch.equal(w.detach(), before) and opt.step_count == 0


@pytest.mark.parametrize("ret", [np.float32(0.25), 0.25, 1, torch.tensor(0.25, dtype=torch.float64)])
def test_real_numbers_are_accepted(ret):
    assert MeZO([_w()], lr=1e-2).step(lambda: ret) == pytest.approx(0.25 if ret != 1 else 1.0)


@pytest.mark.parametrize("seed", [np.int64(7), np.uint64(2**63 + 7), np.int32(7)])
def test_numpy_integer_seed_is_the_same_seed_as_the_python_int(seed):
    opt = MeZO([_w()], lr=1e-2, seed=seed)
    assert type(opt.seed) is int and opt.seed == int(seed)
    assert step_key(seed, np.int64(3)) == step_key(int(seed), 3)


@pytest.mark.parametrize("seed", [3.0, np.float64(3), np.bool_(True), "3", -1])
def test_other_seeds_are_refused(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        MeZO([_w()], lr=1e-2, seed=seed)


def test_only_empty_parameters_are_named_as_such():
    opt = MeZO([torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.ones(2), requires_grad=False)], lr=1e-2)
    with pytest.raises(ValueError, match="1 have requires_grad=False and 1 have no elements"):
        opt.step(lambda: torch.tensor(1.0))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_fp16_update_that_overflows_is_named_at_the_next_step(policy):
    """The update is not checked as it is written (that would be a pass over the weights every step);
    the next step's loss is non-finite, and the error names the weights, whatever nan_policy says
    (skipping could never recover)."""
    w = torch.nn.Parameter(torch.full((64,), 10.0, dtype=torch.float16))
    opt = MeZO([w], lr=1.0, eps=1.0, nan_policy=policy, seed=0)
    f = lambda: w.float().sum() * 1e4  # noqa: E731  (|lr * projected gradient| ~ 1e5 > fp16's 65504)
    opt.step(f)
    assert not torch.isfinite(w).all()
    with pytest.raises(NonFiniteLossError, match="weights themselves hold inf/NaN"):
        opt.step(f)
