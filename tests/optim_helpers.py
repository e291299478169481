"""Shared pieces of the optimizer tests: one intra-op thread, the test MLP (float64 loss), its
data (with the net and its starting weights: problem), the transcriptions' z, bit-identical and
relative comparisons of two weight lists."""
import math
from typing import NamedTuple

import pytest
import torch

from zo_kernels.noise import normal, step_key


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is ~1000x faster than two contended ones on a shared box.
    Autouse in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(ps, x):
    w1, b1, w2, b2 = (p.double() for p in ps)
    return torch.tanh(x.double() @ w1.T + b1) @ w2.T + b2


class Net(torch.nn.Module):
    def __init__(self, d_in=10, hidden=32, d_out=4):
        super().__init__()
        self.l1 = torch.nn.Linear(d_in, hidden)
        self.l2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return mlp([self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias], x)


def data(n=256, seed=0, steps=50):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    batches = [torch.randint(0, n, (32,), generator=g) for _ in range(steps)]
    return x, y, batches


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


class Problem(NamedTuple):
    """The data, the test MLP at its seed, and a copy of its starting weights."""

    x: torch.Tensor
    y: torch.Tensor
    batches: list
    net: Net
    theta0: list


def problem(seed=0) -> Problem:
    x, y, batches = data()
    net = make_net(seed)
    return Problem(x, y, batches, net, [p.detach().clone() for p in net.parameters()])


def gpu_backends(names=("triton", "cuda")) -> list:
    """pytest parameters "backend,device" for the GPU kernels, marked cuda (pytest -m cuda, as
    scripts/gpu_check.sh runs them) and skipped where one cannot run; after the CPU run a test also makes."""
    from backends_helpers import skip_unless

    return [pytest.param(b, "cuda", id=f"{b}-cuda", marks=(pytest.mark.cuda, skip_unless(b, "cuda"))) for b in names]


def assert_same_weights(a_list, b_list, *what):
    """Two weight lists are bit-identical, tensor by tensor."""
    for a, b in zip(a_list, b_list):
        assert torch.equal(a, b), what


def z_of(seed, t, shapes, ids=None):
    k = step_key(seed, t)
    ids = range(len(shapes)) if ids is None else ids
    return [normal(k, i, math.prod(s)).view(s) for i, s in zip(ids, shapes)]


def rel(a_list, b_list):
    a = torch.cat([a.detach().flatten().double().cpu() for a in a_list])   # (GPU runs against CPU statements)
    b = torch.cat([b.detach().flatten().double().cpu() for b in b_list])
    return ((a - b).norm() / b.norm()).item()


def run_steps(opt, net, x, y, batches, steps, start=0):
    """opt.step on the cross-entropy of batches[start], ..., batches[start + steps - 1]; the returned losses."""
    losses = []
    for t in range(start, start + steps):
        idx = batches[t]
        losses.append(opt.step(lambda: torch.nn.functional.cross_entropy(net(x[idx]), y[idx])))
    return losses
