"""Losses and evaluation of a classifier on tokenised splits (zo_kernels.finetune.model.Encoded)."""
from __future__ import annotations

from typing import Dict, List

import torch


def batch_loss(net, batch: Dict[str, torch.Tensor]):
    """(logits, mean cross-entropy computed in float32).  In bf16/fp16 the model's own loss would be
    rounded to ~3 significant digits, which swamps a ZO step's loss difference l+ - l-."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = net(**inputs).logits
    return logits, torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


def batch_objective(net, batch: Dict[str, torch.Tensor], objective: str) -> torch.Tensor:
    """What a ZO method minimises on a batch: cross-entropy, or the error rate 1 - accuracy (not
    differentiable, piecewise constant: MeZO's claim 4 is that ZO can optimise it directly)."""
    logits, loss = batch_loss(net, batch)
    if objective == "accuracy":
        return 1.0 - (logits.argmax(-1) == batch["labels"]).float().mean()
    return loss


def length_sorted_chunks(enc, index, size: int) -> List[List[int]]:
    """Chunks of `index` sorted by length: less padding in micro-batched forward passes."""
    order = sorted(index, key=lambda i: len(enc.ids[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def mean_loss(net, enc, index, micro: int, objective: str = "loss") -> torch.Tensor:
    """Mean objective (default cross-entropy) over `index` (no grad), in length-sorted micro-batches."""
    total = torch.zeros((), dtype=torch.float64)
    index = list(index)
    with torch.no_grad():
        for chunk in length_sorted_chunks(enc, index, micro):
            loss = batch_objective(net, enc.batch(chunk), objective)
            total += loss.double().cpu() * len(chunk)
    return (total / len(index)).float()


def evaluate(net, enc, micro: int) -> Dict[str, float]:
    """Accuracy and mean loss on a whole split."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for chunk in length_sorted_chunks(enc, range(len(enc)), micro):
            b = enc.batch(chunk)
            logits, lv = batch_loss(net, b)
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            loss += float(lv) * len(chunk)
    return {"acc": correct / len(enc), "loss": loss / len(enc)}



def eval_train_index(train, cfg) -> range:
    """The training examples whose mean loss the eval points report: the first `eval_train` of the
    (randomly ordered) training split, or all of it."""
    n = len(train)
    return range(n if cfg.eval_train <= 0 else min(cfg.eval_train, n))


