"""Forward gradient (Baydin et al. 2022, "Gradients without Backpropagation"; ZO-Bench's forward_grad):
the exact directional derivative along seeded noise, by forward-mode AD instead of finite differences.

Step t, per group (η = lr, λ = weight_decay, z = z(step_key(seed, t))):

    (f(θ), ∇f(θ)·z) = torch.func.jvp(f, θ, z)        one forward pass carrying tangents
    θ ← (1 − ηλ)θ − η·(∇f(θ)·z)·z                    one fused pass (z regenerated from the key)

E[(∇f·z) z] = ∇f: an unbiased gradient estimate with no μ and no finite-difference error.

Memory, honestly: jvp needs the tangent z as tensors, so z is materialised with `zo_kernels.noise_`
(one tensor per trainable parameter, in its dtype: the trainable weights' size once more, freed after
the jvp), and forward-mode AD carries a tangent beside every activation (about twice the activation
memory of a plain forward), and attention runs PyTorch's math SDPA backend (fused attention kernels
have no forward-mode derivative), which materialises the attention matrix.  No backward graph is kept.  The update itself is the fused primitive.

The closure runs the forward pass of `module` and returns the loss (or (mean loss, count) when
distributed); it is called inside torch.func.functional_call, so it must use `module` (not a copy).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..noise import step_key
from ..ops import noise_
from .base import ZOOptimizer
from .closure import LocalLoss, split_loss
from .noise_form import noise_kw
from .points import Point


class _ClosureModule(torch.nn.Module):
    """Runs the closure as forward(), so functional_call can swap `m`'s parameters for the jvp's."""

    def __init__(self, module: torch.nn.Module, closure: Callable):
        super().__init__()
        self.m = module
        self.closure = closure

    def forward(self):
        return self.closure()


class ForwardGrad(ZOOptimizer):
    """Forward gradient: `opt = ForwardGrad(model, lr)`, `loss = opt.step(closure)`.

    Args: module (the nn.Module whose trainable parameters are optimised; its parameters form one
    group), lr η, weight_decay λ, seed, and MeZO's core options (record, rounding, backend,
    nan_policy, distributed, ...).  Returns from step: f(θ_t) on the batch.
    """

    _group_checks = {"lr": False, "weight_decay": False}

    def __init__(self, module: torch.nn.Module, lr: float, weight_decay: float = 0.0, seed: int = 0, **core):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"ForwardGrad needs the nn.Module (the jvp runs its forward), got {type(module).__name__}")
        self.module = module
        super().__init__(module.parameters(), dict(lr=lr, weight_decay=weight_decay), seed=seed, **core)

    @property
    def queries_per_step(self) -> int:
        return 1

    def step(self, closure: Optional[Callable] = None) -> float:
        if closure is None and self._closure_free_call():
            return None
        closure = self._require_closure(closure)
        w = self._layout()
        self._check_ranks(w)
        names = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False)}
        entries = [(p, tid) for ts, ids in zip(w.tensors, w.tids) for p, tid in zip(ts, ids)]
        missing = [tid for p, tid in entries if id(p) not in names]
        if missing:
            raise ValueError(f"parameters with tensor ids {missing} do not belong to the module")
        t = self._t
        k = step_key(self.seed, t)
        self._begin_step()
        try:
            count = [None]

            def f(*ps):
                out = functional_call(_ClosureModule(self.module, closure),
                                      {"m." + names[id(p)]: q for (p, _), q in zip(entries, ps)}, ())
                loss, count[0] = split_loss(out)
                return loss

            tangents = tuple(noise_(torch.empty_like(p), k, tid, backend=self.backend, **noise_kw(self.noise)) for p, tid in entries)
            # Fused attention kernels have no forward-mode derivative (torch 2.13): SDPA's math backend.
            with sdpa_kernel([SDPBackend.MATH]):
                loss, dd = jvp(f, tuple(p.detach() for p, _ in entries), tangents)
            del tangents
            loss, dd = float(loss.detach().double()), float(dd.detach().double())
            if self._comm is not None:
                loss, dd = self._sync_losses(LocalLoss(loss, count[0]), LocalLoss(dd, count[0]))
            if not (math.isfinite(loss) and math.isfinite(dd)):
                return self._failed_step(w, list(w.at), {"loss": loss, "jvp": dd})   # nothing moved yet
            self._goto(w, [Point(self._decay(g["lr"], g["weight_decay"]), [(k, -g["lr"] * dd)])
                           for g in self.param_groups], final=True)
            self._t += 1
            return loss
        finally:
            self._in_step = False
