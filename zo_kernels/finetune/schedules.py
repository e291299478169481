"""Schedules over a method's budget: the learning-rate factor (--lr-schedule) and the evaluation points."""
from __future__ import annotations

import math

from .errors import FinetuneError

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, frac: float) -> float:
    """The learning-rate multiplier after `frac` of the budget (0 -> 1): Hugging Face's linear and
    cosine decays to 0 without warm-up, driven by queries spent so every method decays alike.
    A ZO step's update noise is ~lr**2 * d; decaying lr stops the late drift a constant rate shows."""
    frac = min(max(frac, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise FinetuneError(f"unknown lr schedule {schedule!r}; choose from {', '.join(LR_SCHEDULES)}")


class LRSchedule:
    """Sets every `lr*` entry of every param group to base * lr_factor(queries / total).  The bases
    are read from the freshly built optimizer, so a resumed run (whose loaded param groups hold
    already-scaled rates) recomputes the same rates from its query count."""

    def __init__(self, opt, schedule: str, total: int):
        lr_factor(schedule, 0.0)    # validates the name
        self.opt, self.schedule, self.total = opt, schedule, max(1, total)
        self.bases = [{k: g[k] for k in g if k.startswith("lr")} for g in opt.param_groups]

    def apply(self, queries: int) -> float:
        f = lr_factor(self.schedule, queries / self.total)
        for g, base in zip(self.opt.param_groups, self.bases):
            for k, v in base.items():
                g[k] = v * f
        return f



class EvalSchedule:
    """Evaluate test accuracy and full training loss at evenly spaced query counts."""

    def __init__(self, total_queries: int, n_points: int):
        n_points = max(1, n_points)
        self.marks = [round(total_queries * k / n_points) for k in range(1, n_points + 1)]
        self.i = 0

    def due(self, queries: int) -> bool:
        hit = False
        while self.i < len(self.marks) and queries >= self.marks[self.i]:
            self.i += 1
            hit = True
        return hit


