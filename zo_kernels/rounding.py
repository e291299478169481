"""The ops' `rounding` argument and the keys of their stochastic-rounding bits (docs/spec.md §3).

Stochastic rounding draws its per-element words from stream 2 under a rounding key.  A call that
passes none gets one derived from the call itself (the same call rounds the same way on replay,
calls differing in any coefficient draw independent bits); the optimizers pass one per pass of
each step.  Each derivation has its own domain tag, so no two of them can collide by construction.
"""
from __future__ import annotations

from typing import Sequence

from .noise import float_bits, mix_keys, step_key

ROUNDINGS = ("nearest", "stochastic")

_CALL_TAG = 0x5EED5EED        # noise_axpy_'s and noise_adam_'s default keys
_LOWRANK_TAG = 0x10C0F4C7     # lowrank_noise_axpy_'s default keys
_STEP_TAG = 0x524F554E44      # "ROUND": the optimizers' per-pass keys


def check_rounding(rounding) -> str:
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def default_rounding_key(keys: Sequence[int], alphas: Sequence[float], gamma: float, beta: float) -> int:
    """Stochastic-rounding key derived from the call itself: reproducible, and new for every distinct call."""
    return mix_keys(_CALL_TAG, *keys, *(float_bits(a) for a in alphas), float_bits(gamma), float_bits(beta))


def lowrank_rounding_key(keys_u, key_v, alphas, gamma, beta, rank) -> int:
    """lowrank_noise_axpy_'s default key: as default_rounding_key, over its own arguments."""
    return mix_keys(_LOWRANK_TAG, *keys_u, key_v, rank, *(float_bits(a) for a in alphas), float_bits(gamma),
                    float_bits(beta))


def step_rounding_key(seed: int, step: int, call_index: int) -> int:
    """The key an optimizer passes for the call_index-th pass of step `step`: every pass of every step
    draws its own bits, and a recorded trajectory replays them."""
    return mix_keys(_STEP_TAG, step_key(seed, step), call_index)
