"""An optimizer's state_dict: torch.optim's, plus the ZO part (step count, seed, trajectory), with
tensor state kept in the dtype it was saved with and sharded state checked against its parameter."""
from __future__ import annotations

import itertools

import torch

from ..noise import check_u64
from .noise_form import GAUSSIAN
from .sharded_state import check_state
from .state_check import all_or_nothing


class StateMixin:
    """state_dict / load_state_dict of ZOOptimizer; subclasses extend `_zo_state` / `_load_zo_state`."""

    def _zo_state(self) -> dict:
        return {"version": 1, "kind": type(self).__name__, "step": self._t, "seed": self.seed,
                "skipped_steps": self.skipped_steps, "rounding": self.rounding, "noise": self.noise,
                "trajectory": None if self.trajectory is None else [dict(r) for r in self.trajectory]}

    def _load_zo_state(self, zo: dict) -> None:
        if zo.get("kind") != type(self).__name__:
            raise ValueError(f"state_dict was saved by {zo.get('kind')}, not {type(self).__name__}")
        noise = zo.get("noise", GAUSSIAN)      # saved before the option existed: Gaussian
        if noise != self.noise:
            raise ValueError(f"state_dict was saved with noise={noise!r}, this optimizer has noise={self.noise!r}")
        self._t = int(zo["step"])
        self.seed = check_u64(int(zo["seed"]), "seed")
        self.skipped_steps = int(zo.get("skipped_steps", 0))
        self.rounding = zo.get("rounding", self.rounding)
        traj = zo.get("trajectory")
        if traj is not None:
            self.trajectory = [dict(r) for r in traj]
            self.record = True

    def _saved_state_by_param(self, state_dict: dict) -> list:
        """(parameter, saved state) pairs of a state_dict, each value checked against its parameter."""
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(h["params"]) for g, h in zip(groups, self.param_groups)):
            return []       # torch.optim's load raises its own error about the groups
        ids = dict(zip(itertools.chain.from_iterable(g["params"] for g in groups),
                       itertools.chain.from_iterable(g["params"] for g in self.param_groups)))
        out = []
        for idx, st in state_dict.get("state", {}).items():
            p = ids.get(idx)
            if p is None:
                continue
            for k, v in st.items():
                check_state(p, v, f"state_dict['state'][{idx}][{k!r}]")
            out.append((p, st))
        return out

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"] = self._zo_state()
        return sd

    @all_or_nothing     # checks class, groups and every state tensor first; a refused load changes nothing
    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load, except that tensor state keeps the dtype it was saved with.

        torch.optim casts floating state to its parameter's dtype (Adam's moments follow bf16
        weights); the ZO optimizers keep float32 state for bf16/fp16 weights, so the cast would
        round it (and the fused passes refuse non-float32 state).  State of DTensor (FSDP2-sharded)
        parameters must be DTensors sharded like them (see zo_kernels.optim.sharded_state);
        anything else is refused before anything is loaded."""
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError(f"not a {type(self).__name__} state_dict (no 'zo' entry)")
        saved = self._saved_state_by_param(state_dict)
        super().load_state_dict(state_dict)
        for p, st in saved:
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step":
                    self.state[p][k] = v.to(device=p.device)
        self._load_zo_state(zo)
        if self._comm is not None:
            self._comm.verified = False     # check the ranks again at the next step
