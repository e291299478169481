"""Checkpoints of a zo-finetune run: one file, DIR/checkpoint.pt, replaced atomically.

The file holds the run's arguments, the results of every finished (seed, method), and the
state of the method in progress (MethodRun.state_dict(): weights, optimizer state_dict, data
order, RNG states, counters, eval history).  It is written through files.write_atomic (a temporary
file beside it, fsync, rename), so a process killed at any instant, or a full disk, leaves either
the previous checkpoint or the new one, never a torn file.  `zo-finetune --resume DIR` reads it back
with torch.load(weights_only=True) and checks the structure of everything it will read (`check`)
before the run writes anything: a damaged file is one line, and is left as it is.
"""
from __future__ import annotations

import numbers
import os
import pickle
import warnings
import zipfile
from typing import Optional

import torch

from . import files
from .errors import FinetuneError

FILE = "checkpoint.pt"
VERSION = 1


def path(out_dir: str) -> str:
    return os.path.join(out_dir, FILE)


def save(out_dir: str, state: dict) -> None:
    """Atomically (one FinetuneError line, the previous checkpoint intact, if the disk is full)."""
    files.torch_save(path(out_dir), dict(state, version=VERSION))


# ------------------------------------------------------------------ structure
# What --resume reads, by type.  A dict schema lists required keys (others are allowed); (schema,)
# is a list of it; {str: schema} a mapping; None in a tuple of choices allows None.
_NUM, _INT = numbers.Real, numbers.Integral
_START = {"step": _INT, "queries": _INT, "train_loss": _NUM, "test_acc": _NUM, "test_loss": _NUM, "train_s": _NUM}
_RECORD = {"queries": _INT, "steps": _INT, "train_loss": _NUM, "val_acc": _NUM, "test_acc": _NUM, "diverged": bool,
           "curve": (dict,), "step_losses": (list,), "time_per_step_ms": dict}
_ACTIVE = {"method": str, "weights": {str: torch.Tensor}, "optimizer": {"state": dict, "param_groups": (dict,),
                                                                        "zo": dict},
           "sampler": {"perm": torch.Tensor, "pos": _INT, "rng": str}, "annealer": (None, dict), "meter": dict,
           "step": _INT, "t_train": _NUM, "sched_i": _INT, "res": dict, "done": bool, "torch_rng": torch.Tensor}
_CURRENT = {"seed": _INT, "start": _START, "start_eval_s": _NUM, "done": {str: _RECORD}, "active": (None, _ACTIVE)}
_RUN = {"seed": _INT, "start": _START, "start_eval_s": _NUM, "methods": {str: _RECORD}}
SCHEMA = {"version": _INT, "argv": (str,), "runs": (_RUN,), "current": (None, _CURRENT)}


def _check(value, schema, where: str) -> Optional[str]:
    """The first place where `value` does not fit `schema`, as text, or None."""
    if isinstance(schema, tuple) and len(schema) == 2 and schema[0] is None:     # optional
        return None if value is None else _check(value, schema[1], where)
    if isinstance(schema, tuple):                                               # a list of schema[0]
        if not isinstance(value, list):
            return f"{where} is {type(value).__name__}, not a list"
        for i, v in enumerate(value):
            bad = _check(v, schema[0], f"{where}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where} is {type(value).__name__}, not a dict"
        if len(schema) == 1 and next(iter(schema)) is str:                      # a mapping
            for k, v in value.items():
                bad = (f"{where} has a key {k!r} that is not a string" if not isinstance(k, str)
                       else _check(v, schema[str], f"{where}[{k!r}]"))
                if bad:
                    return bad
            return None
        for k, sub in schema.items():
            if k not in value:
                return f"{where} has no {k!r}"
            bad = _check(value[k], sub, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if schema is _NUM and isinstance(value, bool) or not isinstance(value, schema):
        return f"{where} is {type(value).__name__}, not {getattr(schema, '__name__', schema)}"
    return None


def check(state) -> None:
    """Refuse a checkpoint that --resume could not read to the end (one line)."""
    if not isinstance(state, dict) or state.get("version") != VERSION or "argv" not in state:
        raise FinetuneError(f"{FILE} is not a zo-finetune checkpoint of version {VERSION}")
    bad = _check(state, SCHEMA, "checkpoint")
    if bad:
        raise FinetuneError(f"{FILE} is damaged or incomplete: {bad}")


def _unreadable(p: str, e: Exception) -> str:
    """One line for why torch.load refused a file (its own texts run over many lines)."""
    if not zipfile.is_zipfile(p):        # torch.save writes a zip archive; its index is at the end
        return "empty, truncated or not a torch.save file"
    if isinstance(e, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain data (not written by zo-finetune)"
    text = str(e).strip()
    return f"damaged torch.save file ({type(e).__name__}: {text.splitlines()[0] if text else ''})"


def read(p: str) -> dict:
    """torch.load(weights_only=True) of `p` with one line for any failure and no torch warnings."""
    name = os.path.basename(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except OSError as e:
        raise FinetuneError(f"cannot read {name}: {e.strerror or e}") from None
    except Exception as e:
        raise FinetuneError(f"cannot read {name}: {_unreadable(p, e)}") from None


def load(out_dir: str) -> dict:
    p = path(out_dir)
    if not os.path.isdir(out_dir):
        raise FinetuneError(f"--resume {out_dir}: no such directory")
    if not os.path.isfile(p):
        raise FinetuneError(f"--resume {out_dir}: no {FILE} there (was the run started with --checkpoint-every?)")
    try:
        state = read(p)
        check(state)
    except FinetuneError as e:
        raise FinetuneError(f"--resume {out_dir}: {e}") from None
    return state


def find(out_dir: str) -> Optional[str]:
    p = path(out_dir)
    return p if os.path.isfile(p) else None
