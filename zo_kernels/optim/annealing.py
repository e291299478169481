"""Loss-ratio learning-rate annealing (MeZO-SVRG paper, Algorithm 4)."""
from __future__ import annotations

import math
from typing import List, Optional


class LossRatioAnnealing:
    """Every epoch of w = steps_per_epoch losses: if mean(this epoch) / mean(previous epoch) > kappa,
    divide every group's lr (and lr_full, where present) by alpha.

    Call `.step(loss)` once after each optimizer step with the loss it returned.  Epochs are
    consecutive, non-overlapping windows of w losses; the first comparison happens at the
    end of the second epoch.  Non-finite losses are counted like any other (the ratio is then
    not > kappa unless it is +inf, which anneals).
    """

    def __init__(self, optimizer, steps_per_epoch: int, kappa: float = 1.05, alpha: float = 5):
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
        if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be a positive number, got {kappa!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.kappa = float(kappa)
        self.alpha = float(alpha)
        self._current: List[float] = []
        self._previous_mean: Optional[float] = None
        self.num_anneals = 0
        self.history: List[dict] = []     # one entry per finished epoch: ratio and whether it annealed

    def step(self, loss) -> bool:
        """Record one loss; returns True when this call annealed the learning rates."""
        if hasattr(loss, "item"):
            loss = loss.item()
        self._current.append(float(loss))
        if len(self._current) < self.steps_per_epoch:
            return False
        mean = sum(self._current) / len(self._current)
        self._current = []
        annealed, ratio = False, None
        if self._previous_mean is not None:
            ratio = mean / self._previous_mean if self._previous_mean != 0 else math.inf
            if ratio > self.kappa:
                for g in self.optimizer.param_groups:
                    g["lr"] = g["lr"] / self.alpha
                    if "lr_full" in g:
                        g["lr_full"] = g["lr_full"] / self.alpha
                self.num_anneals += 1
                annealed = True
        self.history.append({"mean": mean, "ratio": ratio, "annealed": annealed})
        self._previous_mean = mean
        return annealed

    def state_dict(self) -> dict:
        return {"steps_per_epoch": self.steps_per_epoch, "kappa": self.kappa, "alpha": self.alpha,
                "current": list(self._current), "previous_mean": self._previous_mean,
                "num_anneals": self.num_anneals, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.steps_per_epoch = int(state["steps_per_epoch"])
        self.kappa = float(state["kappa"])
        self.alpha = float(state["alpha"])
        self._current = [float(x) for x in state["current"]]
        self._previous_mean = None if state["previous_mean"] is None else float(state["previous_mean"])
        self.num_anneals = int(state["num_anneals"])
        self.history = [dict(h) for h in state.get("history", [])]
