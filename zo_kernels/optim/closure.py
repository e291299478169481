"""The closure contract of every ZO optimizer's step.

A closure runs a forward pass on the current batch (no backward) and returns the **mean** loss, or a
pair `(mean_loss, count)`.  A single-process optimizer ignores the count; a distributed one combines
ranks as Σ_r mean_r·count_r / Σ_r count_r, the mean over the whole global batch (a bare scalar counts
1, right when every rank has the same number of examples; a rank with count 0 contributes nothing).
"""
from __future__ import annotations

import math
import numbers
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
        return _check_loss(loss), count
    return _check_loss(out), None


def _check_loss(loss):
    """A real scalar tensor or a real number: None, strings, bools and complex values are refused
    (float('0.5') would read a string, and complex -> float drops the imaginary part silently)."""
    if isinstance(loss, torch.Tensor):
        if loss.is_complex() or loss.dtype == torch.bool:
            raise TypeError(f"the closure must return a real loss, got a {loss.dtype} tensor")
        return loss
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        got = "None (did it forget to `return` the loss?)" if loss is None else type(loss).__name__
        raise TypeError(f"the closure must return the mean loss (a real scalar tensor or number) or a pair "
                        f"(mean loss, count), got {got}")
    return loss
