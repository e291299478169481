"""Bookkept points and the moves between them (docs/spec.md §5): the optimizers' arithmetic.

A weight storage holds, in exact arithmetic (Python floats),

    x = a · base + Σ_k c[k] · z(k)

for a base point (θ_t for MeZO, the anchor θ̄ for MeZO-SVRG) and a few seeded noise keys k: a
`Point`.  Going from one point to another is one call of the primitive, a `Move`:

    gamma = a′/a,    alpha_k = c′[k] − gamma · c[k]

Perturb, restore, update, the lookahead perturbation and the multi-key jump θ → θ̄ ± μz are all
moves; weight decay (gamma ≠ 1) compounds exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch


@dataclass
class Point:
    """x = a·base + Σ c[k]·z(k).  Key order is kept: it is the order of the terms in the fused call,
    which fixes its rounding.  `Point(a, [(key, coeff), ...])` adds up repeated keys."""

    a: float = 1.0
    c: Dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        terms = self.c.items() if isinstance(self.c, dict) else (self.c or ())
        self.a = float(self.a)
        self.c = {}
        for k, v in terms:
            self.c[int(k)] = self.c.get(int(k), 0.0) + float(v)

    def plus(self, terms: Iterable[Tuple[int, float]]) -> "Point":
        """This point with Σ v·z(k) added."""
        out = Point(self.a, self.c)
        for k, v in terms:
            out.c[k] = out.c.get(k, 0.0) + float(v)
        return out

    def scaled(self, gamma: float) -> "Point":
        return Point(self.a * gamma, [(k, v * gamma) for k, v in self.c.items()])

    def same_as(self, other: "Point") -> bool:
        """Equal as vectors (a key with coefficient 0 is the same as an absent key)."""
        keys = set(self.c) | set(other.c)
        return self.a == other.a and all(self.c.get(k, 0.0) == other.c.get(k, 0.0) for k in keys)

    def to_state(self) -> list:
        return [self.a, [[k, v] for k, v in self.c.items()]]

    @classmethod
    def from_state(cls, s) -> "Point":
        return cls(s[0], [(int(k), float(v)) for k, v in s[1]])


@dataclass(frozen=True)
class Move:
    """θ ← gamma·θ + Σ_j alpha_j·z(key_j): one call of the primitive, `pairs` = ((key, alpha), ...)."""

    gamma: float
    pairs: Tuple[Tuple[int, float], ...] = ()

    @property
    def is_identity(self) -> bool:
        return self.gamma == 1.0 and not self.pairs


def plan_move(cur: Point, tgt: Point) -> Move:
    """The one call that takes a storage from `cur` to `tgt` (keys with alpha 0 left out)."""
    gamma = tgt.a / cur.a
    pairs = []
    for k in list(cur.c) + [k for k in tgt.c if k not in cur.c]:
        alpha = tgt.c.get(k, 0.0) - gamma * cur.c.get(k, 0.0)
        if alpha != 0.0:
            pairs.append((k, alpha))
    return Move(gamma, tuple(pairs))


def origin(groups: int) -> List[Point]:
    """Every group at its base point."""
    return [Point() for _ in range(groups)]


def spsa_pair(centers: List[Point], key: int, mus: List[float]) -> Tuple[List[Point], List[Point]]:
    """The two points of a two-point (SPSA) estimate around `centers`: center_g ± μ_g·z(key)."""
    return ([c.plus([(key, mu)]) for c, mu in zip(centers, mus)],
            [c.plus([(key, -mu)]) for c, mu in zip(centers, mus)])


@dataclass
class Tracked:
    """Storages the optimizer moves, per parameter group: the tensors, their noise tensor ids, and the
    point each group's storage holds now (`at`, updated by every move)."""

    tensors: List[List[torch.Tensor]]
    tids: List[List[int]]
    at: List[Point]

    def flat(self) -> List[torch.Tensor]:
        return [t for ts in self.tensors for t in ts]


@dataclass
class Excursion:
    """Exact restore (docs/spec.md §4), one storage group: the weights hold round(base + Σ open·z),
    written by one exact-form call; `planes` are the residue planes that call wrote."""

    base: Point
    open: Optional[Dict[int, float]] = None
    planes: Optional[list] = None

    def point(self) -> Point:
        return self.base.plus(list((self.open or {}).items()))


@dataclass(frozen=True)
class Call:
    """The primitive call a group's move becomes; groups with equal calls share one noise_axpy_.
    `undo` set: the exact-restore form, undoing the perturbation Σ undo_j·z(key_j) first."""

    gamma: float
    keys: Tuple[int, ...]
    alphas: Tuple[float, ...]
    rounding: str
    undo: Optional[Tuple[float, ...]] = None
    with_planes: bool = False
