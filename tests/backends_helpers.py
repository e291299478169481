"""The one list of (backend, device) pairs the kernel tests run on, and why a pair is skipped here.

Every registered backend (zo_kernels.backend_status: the available ones and those that could not
load) on every device it declares (Backend.devices: Triton declares "cpu" when interpreted and
"cuda" when compiled).  A pair that cannot run on this machine stays in the list as a skipped test
whose reason says why (the backend's own unavailability, no GPU, or no form of the op), so a
missing backend shows in the test report instead of vanishing from it.

Tests take their parametrisation from targets(); files about one backend (test_native_cpu.py,
test_cuda_*.py, test_triton_kernel.py) decide for themselves whether its absence fails or skips.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

import zo_kernels
from zo_kernels import backends

# The device kinds backends declare; "cuda" runs only with a GPU.
DEVICES = ("cpu", "cuda")
HERE = tuple(d for d in DEVICES if d == "cpu" or torch.cuda.is_available())


def why_not(backend: str, device: str, needs: Optional[str] = None) -> Optional[str]:
    """Why `backend` cannot run here on `device` tensors (with the Backend field `needs`, e.g. "adam"),
    or None when it can."""
    b = backends.get(backend)
    if b.unavailable is not None:
        return f"{backend} unavailable: {b.unavailable}"
    if device not in HERE:
        return f"no {device} device here"
    if device not in b.devices:
        return f"{backend} runs on {b.devices}, not {device}"
    if needs is not None and getattr(b, needs) is None:
        return f"{backend} has no {needs} form"
    return None


def pairs(*, reference: bool = True, device: Optional[str] = None, names: Optional[tuple] = None) -> list:
    """(backend, device) for every registered backend on every device it declares, filtered: without
    the reference (reference=False), on one device kind, or among `names`.  Unavailable pairs included."""
    out = []
    for d in DEVICES if device is None else (device,):
        for name in zo_kernels.backend_status():
            if (name == "reference" and not reference) or (names is not None and name not in names):
                continue
            if d in backends.get(name).devices:
                out.append((name, d))
    return out


def targets(needs: Optional[str] = None, **filters) -> list:
    """pairs(**filters) as pytest parameters for "backend,device", id "backend-device", each
    pair that cannot run here marked skip with its reason (why_not)."""
    params = []
    for b, d in pairs(**filters):
        why = why_not(b, d, needs)
        params.append(pytest.param(b, d, id=f"{b}-{d}", marks=() if why is None else pytest.mark.skip(reason=why)))
    return params


def skip_unless(backend: str, device: str, needs: Optional[str] = None):
    """A skipif mark for a test of one (backend, device) pair, with why_not's reason."""
    why = why_not(backend, device, needs)
    return pytest.mark.skipif(why is not None, reason=why or "")


def devices(needs: Optional[str] = None, **filters) -> list:
    """The device of each pair of targets(needs, **filters) as a pytest parameter for "device", with the
    pair's skip mark: for tests that run once per device a backend runs on."""
    return [pytest.param(p.values[1], id=p.values[1], marks=p.marks) for p in targets(needs, **filters)]


def backends_on(device: str, needs: Optional[str] = None, **filters) -> list:
    """The backend of each pair of targets(needs, device=device, **filters) as a pytest parameter for
    "backend", with the pair's skip mark: for tests whose tensors are on `device`."""
    return [pytest.param(p.values[0], id=p.values[0], marks=p.marks) for p in targets(needs, device=device, **filters)]
