"""Small assertion and oracle helpers shared by the tests."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import torch

from zo_kernels import noise as N

DATA = pathlib.Path(__file__).parent / "data"


REPO = pathlib.Path(__file__).resolve().parent.parent


def load_script(relpath: str, name: str):
    """A repository script (benchmarks/*.py, scripts/*.py: not a package) loaded by path as module `name`,
    registered in sys.modules first (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def spec_vectors() -> dict:
    return json.loads((DATA / "zo_noise_vectors.json").read_text())


def assert_verbose_allclose(actual, expected, *, rtol=0.0, atol=0.0, what=""):
    """allclose that reports the worst elements instead of a bare False."""
    actual = actual.double().reshape(-1)
    expected = expected.double().reshape(-1)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        idx = bad.nonzero().reshape(-1)[:5].tolist()
        rows = ", ".join(f"[{i}] {actual[i].item():.9g} vs {expected[i].item():.9g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements off "
                             f"(max |diff| {diff.max().item():.3g}, atol {atol}, rtol {rtol}): {rows}")


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (float64 result)."""
    info = torch.finfo(dtype)
    mag = x.double().abs().clamp_min(info.tiny)
    exp = torch.floor(torch.log2(mag))
    return torch.exp2(exp - _MANT[dtype])


_MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}


def exact_axpy(params, keys, alphas, gamma=1.0, dense=None, beta=0.0, tensor_ids=None, offsets=None):
    """The primitive in float64 with float64 z: what the fp32 paths approximate."""
    out = []
    for i, p in enumerate(params):
        tid = i if tensor_ids is None else tensor_ids[i]
        off = 0 if offsets is None else offsets[i]
        acc = p.double().reshape(-1) * gamma
        for k, a in zip(keys, alphas):
            acc = acc + a * N.normal(k, tid, p.numel(), offset=off, dtype=torch.float64)
        if dense is not None:
            acc = acc + beta * dense[i].double().reshape(-1)
        out.append(acc.view(p.shape))
    return out


def z_bound(keys, alphas, tid, numel, offset=0):
    """Spec bound on the fp32 noise error of Σ α_j z_j: Σ |α_j|·1e-5·max(1, |z_j|)."""
    b = torch.zeros(numel, dtype=torch.float64)
    for k, a in zip(keys, alphas):
        z = N.normal(k, tid, numel, offset=offset, dtype=torch.float64)
        b += abs(a) * 1e-5 * z.abs().clamp_min(1.0)
    return b
