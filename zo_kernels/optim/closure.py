"""The closure contract of every ZO optimizer's step.

A closure runs a forward pass on the current batch (no backward) and returns the **mean** loss, or a
pair `(mean_loss, count)`.  A single-process optimizer ignores the count; a distributed one combines
ranks as Σ_r mean_r·count_r / Σ_r count_r, the mean over the whole global batch (a bare scalar counts
1, right when every rank has the same number of examples; a rank with count 0 contributes nothing).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch


class LocalLoss:
    """One closure's result on this rank before the all-reduce: mean loss and its count."""

    __slots__ = ("value", "count")

    def __init__(self, value: float, count: float):
        self.value, self.count = value, count


def split_loss(out) -> Tuple[Any, Optional[float]]:
    """A closure's return value -> (loss, count or None).  Accepts loss or (loss, count)."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"a closure returns the loss or a pair (mean loss, count), got {len(out)} values")
        loss, count = out
        if isinstance(count, torch.Tensor):
            if count.numel() != 1:
                raise ValueError(f"the count must be a scalar, got shape {tuple(count.shape)}")
            count = count.item()
        if isinstance(count, bool) or not isinstance(count, (int, float)):
            raise TypeError(f"the count (second value a closure returns) must be a number, "
                            f"got {type(count).__name__}")
        count = float(count)
        if not math.isfinite(count) or count < 0:
            raise ValueError(f"the count must be finite and >= 0, got {count}")
        return loss, count
    return out, None
