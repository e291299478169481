"""The ranking's runs (issue 25): per method a learning-rate grid around its registry default, one
`zo-finetune` run per (rate, seed), each in its own directory with its own argument list.

- Grid: the method's learning rate (its registry `lr_knob`) at the value `zo-finetune` would use with
  the same pass-through arguments -- its default, or the rule that derives it (n-SPSA's q x --lr-mezo,
  ...) -- times each factor of the grid (default 0.25, 0.5, 1, 2: log-spaced).  A rate knob that this
  method alone reads (MeZO-SVRG's full-step rate eta1 beside eta2) is scaled by the same factor, so the
  pair keeps its ratio.
- Budget: the pass-through arguments' ZO query budget for every run; the first-order references get
  --fo-epochs = queries / --n-train (the same number of forward examples) unless --fo-epochs is given.
- Other grids: `grids` replaces a method's grid by its own `Grid` (candidate rates, each under a factor)
  -- the MeZO-SVRG paper-setting study (svrg_paper.py) tunes MeZO and MeZO-SVRG over the paper's rates
  this way.
- Seeds: the grid runs at seed TUNE_SEED; the chosen rate then at the other `seeds` (default SEEDS).  Peak
  memory is measured once per method, in its MEMORY_SEED run (--no-memory elsewhere).
- Directories: OUT/<method>/lr<rate>/seed<S>.
"""
from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..cli import build_parser, check_args
from ..config import TrainConfig, query_budget
from ..errors import FinetuneError
from ..registry import KNOBS, METHODS, is_zo, knob_users

DEFAULT_FACTORS = (0.25, 0.5, 1.0, 2.0)
MIN_GRID = 4                        # issue 25: at least four rates per method
SEEDS = (0, 1, 2)
TUNE_SEED = 0
MEMORY_SEED = 1
FO_REFERENCE = ("fo-sgd", "fo-adam")
# zo-finetune options the harness sets for every run itself (besides the tuned rates)
OWNED = ("methods", "seed", "seeds", "out", "resume", "checkpoint_every")
_UNSET = object()


def default_methods() -> List[str]:
    """Every ZO method of the registry, then the first-order references."""
    return [m for m in METHODS if is_zo(m)] + list(FO_REFERENCE)


def tuned_knobs(method: str) -> List[str]:
    """The knobs the grid scales: the method's learning rate, then the rates only this method reads."""
    m = METHODS[method]
    if m.lr_knob is None:
        raise FinetuneError(f"method {method} declares no learning-rate knob; it cannot be tuned")
    return [m.lr_knob] + [k.name for k in m.knobs
                          if k.rate and k.name != m.lr_knob and knob_users(k.name) == [method]]


@functools.lru_cache(maxsize=None)
def flag(dest: str) -> str:
    """zo-finetune's option for argument `dest` (--lr-mezo for lr_mezo)."""
    return next(a.option_strings[0] for a in build_parser()._actions if a.dest == dest)


def given(extra: Sequence[str], dests: Sequence[str]) -> set:
    """The dests among `dests` that the zo-finetune arguments `extra` set (abbreviations included)."""
    p = build_parser()
    p.set_defaults(**{d: _UNSET for d in dests})
    a = p.parse_args(list(extra))
    return {d for d in dests if getattr(a, d) is not _UNSET}


def _checked(factors: Sequence[float], min_grid: int) -> List[float]:
    """`factors` sorted, or one FinetuneError line: they must be distinct, positive and at least min_grid."""
    factors = list(factors)
    if any(not (math.isfinite(f) and f > 0) for f in factors) or len(set(factors)) != len(factors):
        raise FinetuneError(f"the grid factors must be distinct positive numbers, got {factors}")
    if len(factors) < min_grid:
        raise FinetuneError(f"the grid has {len(factors)} factors; the ranking tunes over at least {min_grid}")
    return sorted(factors)


Rates = Tuple[Tuple[str, float], ...]        # ((knob, value), ...), the learning rate first


@dataclass(frozen=True)
class Grid:
    """A method's candidate rates, each under its factor: ((factor, rates), ...), sorted by factor.  The
    factor names the candidate (directories, ranking.json) and orders it; the rates are what runs."""
    points: Tuple[Tuple[float, Rates], ...]

    @staticmethod
    def scaled(base: Rates, factors: Sequence[float], knobs: Sequence[str]) -> "Grid":
        """`base` with the knobs in `knobs` times each factor, the others kept."""
        return Grid(tuple((f, tuple((k, v * f if k in knobs else v) for k, v in base)) for f in factors))

    @property
    def factors(self) -> Tuple[float, ...]:
        return tuple(f for f, _ in self.points)

    def rates(self, factor: float) -> Rates:
        return dict(self.points)[factor]

    @property
    def base(self) -> Rates:
        """The rates at factor 1 (the default the grid is built around), else at the first factor."""
        return dict(self.points).get(1.0, self.points[0][1])

    @property
    def edges(self) -> Tuple[float, float]:
        return self.factors[0], self.factors[-1]


@dataclass(frozen=True)
class Run:
    """One zo-finetune run of the ranking."""
    method: str
    factor: float
    seed: int
    rates: Rates
    dir: str
    argv: Tuple[str, ...]

    @property
    def lr(self) -> float:
        return self.rates[0][1]


class Plan:
    """The runs of ranking `methods` with grid `factors` and the zo-finetune arguments `extra` into `out`
    (bad input: one FinetuneError line, before any run)."""

    def __init__(self, out: str, methods: Sequence[str], factors: Sequence[float], extra: Sequence[str] = (),
                 lanes: int = 1, checkpoint_every: int = 200, min_grid: int = MIN_GRID,
                 grids: Optional[Dict[str, Grid]] = None, seeds: Sequence[int] = SEEDS):
        self.out, self.methods, self.factors, self.extra = out, list(methods), list(factors), list(extra)
        self.lanes, self.checkpoint_every, self.seeds = lanes, checkpoint_every, tuple(seeds)
        if TUNE_SEED not in self.seeds:
            raise FinetuneError(f"the seeds must include the tuning seed {TUNE_SEED}, got {list(self.seeds)}")
        for m in self.methods:
            if m not in METHODS:
                raise FinetuneError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise FinetuneError(f"the methods must be a non-empty list without repeats, got {','.join(self.methods)}")
        self.factors = _checked(self.factors, min_grid)
        if lanes < 1:
            raise FinetuneError(f"--lanes must be >= 1, got {lanes}")
        if checkpoint_every < 0:
            raise FinetuneError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
        grids = dict(grids or {})
        for m, g in grids.items():
            if m not in self.methods:
                raise FinetuneError(f"a grid is given for {m}, which is not among the methods")
            for k, _ in g.base:
                if m not in knob_users(k):
                    raise FinetuneError(f"{m}'s grid sets {flag(k)}, which {m} does not read")
            fs = _checked(g.factors, min_grid)
            grids[m] = Grid(tuple((f, g.rates(f)) for f in fs))
            if len({r[0][1] for _, r in g.points}) != len(fs):
                raise FinetuneError(f"{m}'s grid repeats a learning rate (its runs are named by it)")
        knobs = {k: m for m in self.methods
                 for k in ([k for k, _ in grids[m].base] if m in grids else tuned_knobs(m))}
        self.given = given(self.extra, list(OWNED) + list(knobs) + ["threads", "fo_epochs"])
        for d in sorted(self.given & (set(OWNED) | set(knobs))):
            why = f"the grid sets it for {knobs[d]}" if d in knobs else "the harness sets it for every run"
            raise FinetuneError(f"do not pass {flag(d)}: {why}")
        if lanes > 1 and "threads" in self.given:
            raise FinetuneError("do not pass --threads with --lanes: each lane runs with --threads 1")
        self.args = build_parser().parse_args(self.extra)
        check_args(self.args)
        self.queries = query_budget(self.args)
        cfg = TrainConfig.from_args(self.args, queries=self.queries)
        self.grids: Dict[str, Grid] = {
            m: grids[m] if m in grids else
            Grid.scaled(tuple((k, cfg.option(k)) for k in tuned_knobs(m)), self.factors, tuned_knobs(m))
            for m in self.methods}
        for m in self.methods:
            for f in self.grids[m].factors:
                for k, v in self.rates(m, f):
                    why = KNOBS[k].problem(v, self.args.weight_decay) if k in KNOBS else None
                    if why:
                        raise FinetuneError(f"{m} at grid factor {f:g}: {why}")

    def rates(self, method: str, factor: float) -> Rates:
        return self.grids[method].rates(factor)

    def run(self, method: str, factor: float, seed: int) -> Run:
        rates = self.rates(method, factor)
        d = os.path.join(self.out, method, f"lr{rates[0][1]:.6g}", f"seed{seed}")
        argv = [*self.extra, "--methods", method, "--seed", str(seed), "--out", d, "--no-progress",
                "--checkpoint-every", str(self.checkpoint_every)]
        for k, v in rates:
            argv += [flag(k), repr(v)]
        if not is_zo(method) and "fo_epochs" not in self.given:
            argv += ["--fo-epochs", repr(self.queries / self.args.n_train)]
        if self.lanes > 1:
            argv += ["--threads", "1"]
        if seed != MEMORY_SEED:
            argv += ["--no-memory"]
        return Run(method, factor, seed, rates, d, tuple(argv))

    def grid(self, method: str) -> List[Run]:
        return [self.run(method, f, TUNE_SEED) for f in self.grids[method].factors]

    def seed_runs(self, method: str, factor: float) -> List[Run]:
        """The chosen rate's runs at every seed (the TUNE_SEED one is the grid's)."""
        return [self.run(method, factor, s) for s in self.seeds]

    def without(self, methods) -> "Plan":
        """This plan less `methods` (those carried from an earlier ranking: not run again)."""
        p = copy.copy(self)
        p.methods = [m for m in self.methods if m not in methods]
        return p

    def n_runs(self) -> int:
        return sum(len(self.grids[m].factors) + len(self.seeds) - 1 for m in self.methods)
