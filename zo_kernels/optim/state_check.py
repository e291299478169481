"""What `ZOOptimizer.load_state_dict` checks before it changes anything, and its all-or-nothing rule.

A state_dict is refused (ValueError or TypeError, one line) unless it was saved by the same class,
its param groups match this optimizer's (count, sizes, every hyperparameter key this optimizer
reads, numbers that are numbers), every state entry belongs to a parameter, and every state
tensor is one the class keeps for that parameter (`_state_layout(p)`: key -> global shape and
dtype) with that shape and dtype.  State on another device is moved to the parameter's, as
torch.optim does.  `all_or_nothing` wraps the load: anything the class-specific parts refuse later
puts every attribute back, so a refused load leaves the optimizer exactly as it was.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
from typing import Dict, Tuple

import torch

from .sharded_state import check_state

Layout = Dict[str, Tuple[tuple, torch.dtype]]


def state_layout(opt, p: torch.Tensor) -> Layout:
    """The tensor state `opt` keeps for parameter p (none unless its class says otherwise)."""
    f = getattr(opt, "_state_layout", None)
    return f(p) if f is not None else {}


def _check_group(i: int, saved, current: dict) -> None:
    where = f"state_dict['param_groups'][{i}]"
    if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
        raise ValueError(f"{where} is not a param group (a dict with 'params')")
    if len(saved["params"]) != len(current["params"]):
        raise ValueError(f"{where} has {len(saved['params'])} parameters; this optimizer's group {i} has "
                         f"{len(current['params'])}")
    missing = sorted(k for k in current if k not in saved and k != "param_names")
    if missing:
        raise ValueError(f"{where} has no {', '.join(map(repr, missing))} (saved by another optimizer?)")
    for k, mine in current.items():
        if k in ("params", "param_names"):
            continue
        v = saved[k]
        if isinstance(mine, numbers.Real) and not isinstance(mine, bool):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{where}[{k!r}] must be a finite number, got {v!r}")
        elif isinstance(mine, (tuple, list)) and (not isinstance(v, (tuple, list)) or len(v) != len(mine)):
            raise ValueError(f"{where}[{k!r}] must be a sequence of {len(mine)}, got {v!r}")


def _check_tensor(opt, p: torch.Tensor, idx, key, v) -> None:
    where = f"state_dict['state'][{idx}][{key!r}]"
    check_state(p, v, where)          # sharding (DTensor) first: its message names the fix
    layout = state_layout(opt, p)
    if key not in layout:
        keeps = ", ".join(map(repr, layout)) or "no tensor state"
        raise ValueError(f"{where}: {type(opt).__name__} keeps {keeps} for a parameter of shape "
                         f"{tuple(p.shape)} (state saved by another optimizer or configuration?)")
    shape, dtype = layout[key]
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{where} must be a tensor, got {type(v).__name__}")
    if tuple(v.shape) != tuple(shape) or v.dtype != dtype:
        raise ValueError(f"{where} is {v.dtype} of shape {tuple(v.shape)}; the parameter of shape "
                         f"{tuple(p.shape)} needs {dtype} of shape {tuple(shape)}")
    if v.layout != torch.strided or v.is_meta:
        raise ValueError(f"{where} must be a dense tensor with data (got layout {v.layout}, device {v.device})")


def check_loadable(opt, state_dict) -> None:
    """Refuse a state_dict `opt` cannot load, before anything is changed (see the module docstring)."""
    name = type(opt).__name__
    if not isinstance(state_dict, dict):
        raise TypeError(f"{name}.load_state_dict takes a dict, got {type(state_dict).__name__}")
    zo = state_dict.get("zo")
    if not isinstance(zo, dict):
        raise ValueError(f"not a {name} state_dict (no 'zo' entry)")
    if zo.get("kind") != name:
        raise ValueError(f"state_dict was saved by {zo.get('kind')}, not {name}")
    for k in ("step", "seed"):
        if isinstance(zo.get(k), bool) or not isinstance(zo.get(k), numbers.Integral) or zo[k] < 0:
            raise ValueError(f"state_dict['zo'][{k!r}] must be an integer >= 0, got {zo.get(k)!r}")
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, (list, tuple)) or not isinstance(state, dict):
        raise ValueError(f"not a {name} state_dict (no 'param_groups' list and 'state' dict)")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups; this optimizer has {len(opt.param_groups)}")
    for i, (g, h) in enumerate(zip(groups, opt.param_groups)):
        _check_group(i, g, h)
    ids = dict(zip(itertools.chain.from_iterable(g["params"] for g in groups),
                   itertools.chain.from_iterable(g["params"] for g in opt.param_groups)))
    for idx, st in state.items():
        if idx not in ids:
            raise ValueError(f"state_dict['state'] has an entry {idx!r} that is no parameter of its param groups")
        if not isinstance(st, dict):
            raise ValueError(f"state_dict['state'][{idx}] must be a dict, got {type(st).__name__}")
        p = ids[idx]
        for k, v in st.items():
            _check_tensor(opt, p, idx, k, v)
        missing = sorted(k for k in state_layout(opt, p) if k not in st)
        if st and missing:      # a parameter's state is created whole (Adam's m with v)
            raise ValueError(f"state_dict['state'][{idx}] has no {', '.join(map(repr, missing))}")


def all_or_nothing(load):
    """Decorator of load_state_dict: check first; if the load still fails, restore every attribute."""
    @functools.wraps(load)
    def wrapper(self, state_dict):
        check_loadable(self, state_dict)
        before = dict(vars(self))   # torch.optim's load and _load_zo_state rebind, never mutate, these
        try:
            return load(self, state_dict)
        except BaseException:
            vars(self).clear()
            vars(self).update(before)
            raise
    return wrapper
