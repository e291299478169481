"""Settling: a lookahead optimizer (MeZO) leaves the weights perturbed between steps; evaluation,
saving and the HF Trainer's optimizer.eval() must see θ_t.  Optimizers that never stay perturbed
inherit the no-ops."""
from __future__ import annotations

import contextlib
import warnings

import torch


class SettleMixin:
    """is_perturbed / settle and the guards built on them (ZOOptimizer; MeZO overrides the first two)."""

    @property
    def is_perturbed(self) -> bool:
        """True when the weights sit at a perturbed point between steps (MeZO lookahead)."""
        return False

    def settle(self) -> None:
        """Bring the weights to the current iterate θ_t (no-op unless they are perturbed)."""

    def eval(self) -> None:
        """Called by the HF Trainer before evaluation (the schedule-free protocol): settles."""
        self.settle()

    def train(self) -> None:
        """Called by the HF Trainer in each training step: nothing to do."""

    @contextlib.contextmanager
    def settled(self):
        """`with opt.settled(): evaluate(model)` -- the weights are θ_t inside (and stay so after)."""
        self.settle()
        yield self

    def watch(self, module: torch.nn.Module, action: str = "settle"):
        """Guard a module: a forward pass outside `step` while the weights are perturbed settles them
        first (action="settle"), warns and settles ("warn"), or raises ("raise").  Returns the hook handle."""
        if action not in ("settle", "warn", "raise"):
            raise ValueError(f"action must be 'settle', 'warn' or 'raise', got {action!r}")

        def hook(mod, args):
            if self._in_step or not self.is_perturbed:
                return None
            if action == "raise":
                raise RuntimeError(f"{type(self).__name__}: forward pass on perturbed weights outside step(); "
                                   f"call opt.settle() (or use `with opt.settled():`) before evaluating")
            if action == "warn":
                warnings.warn(f"{type(self).__name__}: forward pass on perturbed weights outside step(); "
                              f"settling them first", RuntimeWarning, stacklevel=2)
            self.settle()
            return None

        return module.register_forward_pre_hook(hook)
