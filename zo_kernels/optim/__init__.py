"""Zeroth-order optimizers on the fused noise primitive.

    from zo_kernels.optim import MeZO, MeZOSVRG, LossRatioAnnealing, replay
    opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3, seed=0)
    loss = opt.step(lambda: model(**batch).loss)                    # forward passes only
    opt = MeZOSVRG(model.parameters(), lr=1e-6, lr_full=1e-5, q=2, anchor="dense")
    loss = opt.step(closure, full_closure=big_batch_closure if opt.is_full_step else None)
    opt = LOZO(model.parameters(), lr=1e-6, eps=1e-3, rank=2, nu=50)   # low-rank U Vᵀ perturbations
    opt = LOZOM(model.parameters(), lr=1e-6, rank=2, nu=50, beta=0.9)  # with momentum in the U-space

ZO-Bench's family (Zhang et al. 2024) on the same primitive: ZOSGDSign, MeZO(n_directions=q) (n-SPSA),
ZOSGDCons, ZOSGDMomentum(state="dense" | "seeded"), ZOAdam (the fused noise_adam_ pass), ForwardGrad.
FZOO (Dang et al. 2025): N one-sided ±1 directions and a clean forward, normalised by the losses' std.
HiZOO (Zhao et al. 2025): a diagonal curvature h, perturbations μ·z/√h (the scaled primitive, docs/spec.md §10).
Every optimizer takes noise="gaussian" | "rademacher"; the SPSA ones layer_fraction=ρ (LeZO's sampling).
"""
from .annealing import LossRatioAnnealing
from .base import NonFiniteLossError, ZOOptimizer
from .cons import ZOSGDCons
from .forward_grad import ForwardGrad
from .fzoo import FZOO
from .hizoo import HiZOO
from .lozo import LOZO, LOZOM
from .mezo import MeZO
from .momentum import ZOSGDMomentum
from .sign import ZOSGDSign
from .spsa import SPSAOptimizer
from .svrg import MeZOSVRG
from .trajectory import replay
from .zo_adam import ZOAdam

__all__ = ["MeZO", "MeZOSVRG", "LOZO", "LOZOM", "ZOSGDSign", "ZOSGDCons", "ZOSGDMomentum", "ZOAdam", "ForwardGrad", "FZOO", "HiZOO",
           "SPSAOptimizer", "LossRatioAnnealing", "NonFiniteLossError", "ZOOptimizer", "replay"]
