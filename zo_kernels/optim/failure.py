"""A failed step: the closure raised or returned NaN/inf before the update.  The weights go back to
where `step` found them -- from the snapshot (snapshot=True: bit-identical) or by one more move of
the step's own kind -- and the step counter does not advance (ZOOptimizer's docstring states how
exact each way back is)."""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch

from .points import Point, Tracked
from .sharded_state import local_state


class NonFiniteLossError(FloatingPointError):
    """A closure returned NaN/inf; the weights were restored to θ before the step."""


class FailedStepMixin:
    """ZOOptimizer's failure handling (its state: _t, _snap, _snap_bufs, _comm, _excursions, nan_policy)."""

    @contextlib.contextmanager
    def _failing_back(self, w: Tracked, entry: List[Point], on_fail: Optional[Callable[[], None]] = None):
        """The body of a step: if it raises before the update (the step counter did not advance), the
        weights go back to `entry`, where step found them (`on_fail` first puts back any other state)."""
        t = self._t
        try:
            yield
        except BaseException:
            if self._t == t:
                self._restore_failed(w, entry, on_fail)
            raise
        finally:
            self._snap = None
            self._in_step = False

    def _failed_step(self, w: Tracked, entry: List[Point], losses: dict,
                     on_fail: Optional[Callable[[], None]] = None) -> float:
        """A non-finite loss: restore `entry`, then raise NonFiniteLossError or (nan_policy="skip")
        count the skip and return NaN."""
        self._restore_failed(w, entry, on_fail)
        desc = ", ".join(f"{k}={v}" for k, v in losses.items())
        bad = next(((t, p) for ts, ids in zip(w.tensors, w.tids) for p, t in zip(ts, ids)
                    if not bool(torch.isfinite(local_state(p)).all())), None)
        if bad is not None:     # skipping cannot help: an earlier update overflowed the weights' dtype
            raise NonFiniteLossError(f"{type(self).__name__} step {self._t}: non-finite loss ({desc}) because the "
                                     f"weights themselves hold inf/NaN (tensor id {bad[0]}, {bad[1].dtype}, shape "
                                     f"{tuple(bad[1].shape)}): an earlier update left the dtype's range; lower "
                                     f"the learning rate or train in float32")
        if self.nan_policy == "raise":
            raise NonFiniteLossError(f"{type(self).__name__} step {self._t}: non-finite loss ({desc}); the "
                                     f"weights were restored to their value before the step and the step "
                                     f"counter was not advanced (nan_policy='skip' skips such steps instead)")
        self.skipped_steps += 1
        return float("nan")

    def _take_snapshot(self, tensors: List[List[torch.Tensor]], extra: Sequence[torch.Tensor] = ()) -> None:
        """snapshot=True: copy the trainable weights (and `extra` state the step writes, e.g. SVRG's
        anchor buffers) before the step's first pass: one more read+write pass, their memory again."""
        if not self.snapshot:
            return
        local = self._comm.local_views(tensors)[0] if self._comm is not None else tensors
        targets = [x for ts in local for x in ts] + list(extra)
        # The copies are kept between steps: the peak memory is the same, and a fresh CPU allocation
        # costs page faults on every step (measured ~1.8x the time of a copy into a kept buffer).
        keep = self._snap_bufs
        if keep is None or len(keep) != len(targets) or any(
                b.shape != t.shape or b.dtype != t.dtype or b.device != t.device for b, t in zip(keep, targets)):
            keep = self._snap_bufs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in targets]
        with torch.no_grad():
            for b, t in zip(keep, targets):
                b.copy_(t)
        self._snap = list(zip(targets, keep))

    def _restore_failed(self, w: Tracked, entry: List[Point], on_fail: Optional[Callable[[], None]] = None) -> None:
        """A step failed before its update: bring the weights back to `entry`, where step found them.

        With snapshot=True the copy taken by `_take_snapshot` is written back: bit-identical for every
        dtype and restore mode.  Otherwise the restore is one more move of the step's own kind (fused:
        a third rounding; exact: the rounding is inverted), whose precision the class docstring states."""
        if on_fail is not None:
            on_fail()
        snap, self._snap = self._snap, None
        if snap is None:
            self._goto(w, entry)
            return
        with torch.no_grad():
            for t, copy in snap:
                t.copy_(copy)
        if self._comm is not None:
            self._comm.refresh(self._comm.local_views(w.tensors)[2])   # FSDP2: re-gather the restored shards
        self._excursions.clear()        # the weights are exactly `entry` again
        w.at = list(entry)
