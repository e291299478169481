"""zo-finetune's registry has ZO-Bench's family and LOZO / LOZO-M: each name builds its optimizer, and its step cost is
the optimizer's own query count (so equal budgets stay equal)."""
import pytest
import torch

from zo_kernels import optim
from zo_kernels.finetune.methods import METHODS, TrainConfig

NEW = {"n-spsa": optim.MeZO, "zo-sgd-sign": optim.ZOSGDSign, "zo-sgd-cons": optim.ZOSGDCons,
       "zo-sgd-mmt": optim.ZOSGDMomentum, "zo-sgd-mmt-dense": optim.ZOSGDMomentum, "zo-adam": optim.ZOAdam,
       "lozo": optim.LOZO, "lozo-m": optim.LOZOM}


@pytest.mark.parametrize("name", sorted(NEW))
def test_registered_with_its_query_cost(name):
    cfg = TrainConfig(batch_size=8, q=3)
    m = METHODS[name]
    assert m.kind == "zo"
    net = torch.nn.Linear(4, 2)
    opt = m.make_optimizer(list(net.parameters()), cfg)
    assert type(opt) is NEW[name]
    calls = [0]

    def closure():
        calls[0] += 1
        return net(torch.ones(8, 4)).pow(2).mean()

    opt.step(closure)
    assert m.step_cost(opt, cfg, 0) == calls[0] * cfg.batch_size
    if name == "n-spsa":
        assert calls[0] == 2 * 3
