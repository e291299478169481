"""The rate each method is ranked at, chosen from its grid runs on the validation split."""
from __future__ import annotations

import math
from typing import List, Tuple

from .. import merge
from .plan import Plan, Run


def record(run: Run) -> dict:
    """The run's results.json entry for its method (one FinetuneError line when it cannot be read)."""
    return merge.load(run.dir)["methods"][run.method]


def _score(rec: dict) -> tuple:
    val, loss = rec.get("val_acc"), rec.get("train_loss")
    val = val if isinstance(val, (int, float)) and math.isfinite(val) else -math.inf
    loss = loss if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf
    return bool(rec.get("diverged")), -val, loss


def choose(grid: List[Tuple[Run, dict]]) -> Run:
    """The rate a method is ranked at, from its grid runs (Run, the method's results.json entry): the best
    final VALIDATION accuracy (test accuracy is never looked at); ties go to the lower final train loss,
    then to the lower rate; a diverged run (loss not finite) ranks below every run that did not diverge."""
    return min(grid, key=lambda rr: (*_score(rr[1]), rr[0].lr))[0]


def grid_records(plan: Plan, method: str) -> List[Tuple[Run, dict]]:
    return [(r, record(r)) for r in plan.grid(method)]
