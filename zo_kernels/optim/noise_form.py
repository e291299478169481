"""The noise form of an optimizer's directions (its `noise=` option): which forms exist, and the op
keyword that selects one.  "gaussian" is passed to no op, so a Gaussian optimizer issues exactly the
calls it issued before the option existed."""
from __future__ import annotations

from ..noise import NOISE_FORMS

GAUSSIAN = "gaussian"


def check_noise_form(noise) -> str:
    if not isinstance(noise, str) or noise not in NOISE_FORMS:
        raise ValueError(f"noise must be one of {NOISE_FORMS}, got {noise!r}")
    return noise


def noise_kw(noise: str) -> dict:
    """The keyword arguments that select `noise` on noise_axpy_, noise_ and noise_adam_ (none for Gaussian)."""
    return {} if noise == GAUSSIAN else {"noise": noise}
