"""`zo-finetune --save-log`: which methods can be logged, and one Recorder per (seed, method).

A method can be logged when every change its optimizer makes to the weights is a noise pass that
its trajectory records: MeZO (with or without lookahead), MeZO-SVRG (both anchors), n-SPSA,
ZO-SGD-Sign / -Cons, seeded momentum, LOZO, forward-grad.  Not: first-order methods (their updates
are gradients), dense momentum, ZO-Adam and LOZO-M (dense tensor state in the update; their
optimizers refuse record=True, and that refusal is what decides here).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from .model import embedded_names, named_trainable
from .replay import Recorder


def why_not_loggable(method: str, cfg) -> Optional[str]:
    """None when `method` can be logged, else the reason (probed: its optimizer built with record=True
    on a small module, so the optimizers' own rule decides)."""
    from ..finetune.registry import METHODS

    spec = METHODS[method]
    if spec.kind != "zo":
        return "first-order: its updates are gradients, not noise passes"
    probe = torch.nn.Linear(4, 4, bias=False)
    try:
        opt = spec.build(probe, list(probe.parameters()), dataclasses.replace(cfg, record=True, distributed=False))
    except (ValueError, TypeError) as e:
        return str(e).splitlines()[0]
    if getattr(opt, "trajectory", None) is None:
        return f"{type(opt).__name__} keeps no trajectory of noise passes"
    if getattr(opt, "unloggable", None):
        return opt.unloggable
    return None


def log_path(out: str, seed: int, method: str) -> str:
    return os.path.join(out, "logs", f"seed{seed}_{method}.zolog")


def start(opt, net, trainable, recipe: dict) -> Recorder:
    """A Recorder for `opt` over zo-finetune's trainable tensors (call before the first step)."""
    return Recorder(opt, named_trainable(net, trainable), base=recipe,
                    embed=embedded_names(net, recipe["head"], trainable))


def finish(rec: Recorder, out: str, seed: int, method: str) -> dict:
    """Write the log; returns results.json's entry for it."""
    path = log_path(out, seed, method)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    size = rec.save(path)
    return {"path": path, "bytes": size, "steps": int(rec.opt._t), "passes": len(rec.opt.trajectory)}
