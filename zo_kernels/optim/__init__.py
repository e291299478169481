"""Zeroth-order optimizers on the fused noise primitive.

    from zo_kernels.optim import MeZO, MeZOSVRG, LossRatioAnnealing, replay
    opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3, seed=0)
    loss = opt.step(lambda: model(**batch).loss)                    # forward passes only
    opt = MeZOSVRG(model.parameters(), lr=1e-6, lr_full=1e-5, q=2, anchor="dense")
    loss = opt.step(closure, full_closure=big_batch_closure if opt.is_full_step else None)
"""
from .annealing import LossRatioAnnealing
from .base import NonFiniteLossError, ZOOptimizer, replay
from .mezo import MeZO
from .svrg import MeZOSVRG

__all__ = ["MeZO", "MeZOSVRG", "LossRatioAnnealing", "NonFiniteLossError", "ZOOptimizer", "replay"]
