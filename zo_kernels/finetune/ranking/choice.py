"""The rate each method is ranked at, chosen from its grid runs on the validation split."""
from __future__ import annotations

import math
from typing import List, Tuple

from .. import merge
from .plan import Plan, Run


def record(run: Run) -> dict:
    """The run's results.json entry for its method (one FinetuneError line when it cannot be read)."""
    return merge.load(run.dir)["methods"][run.method]


def rank_key(val_acc, train_loss, diverged, lr: float) -> tuple:
    """The choice rule as a sort key, lowest best: a run that did not diverge, then the best final
    VALIDATION accuracy (test accuracy is never looked at), then the lower final train loss, then the lower
    rate.  A missing or non-finite accuracy or loss counts as the worst."""
    val = val_acc if isinstance(val_acc, (int, float)) and math.isfinite(val_acc) else -math.inf
    loss = train_loss if isinstance(train_loss, (int, float)) and math.isfinite(train_loss) else math.inf
    return bool(diverged), -val, loss, lr


def choose(grid: List[Tuple[Run, dict]]) -> Run:
    """The rate a method is ranked at, from its grid runs (Run, the method's results.json entry), by
    rank_key: a diverged run (loss not finite) ranks below every run that did not diverge."""
    return min(grid, key=lambda rr: rank_key(rr[1].get("val_acc"), rr[1].get("train_loss"), rr[1].get("diverged"),
                                             rr[0].lr))[0]


def grid_records(plan: Plan, method: str) -> List[Tuple[Run, dict]]:
    return [(r, record(r)) for r in plan.grid(method)]
