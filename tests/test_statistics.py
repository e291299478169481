"""Statistical checks of zo-noise v1: moments, tails, independence across ids, streams and steps.

Bounds are several standard errors wide for 10^6 draws, so a correct generator
passes with overwhelming probability and a broken one (wrong pairing, reused
counters, correlated keys) fails.
"""
import math

import pytest
import torch

from zo_kernels import noise as N

M = 1_000_000


@pytest.fixture(scope="module")
def draws():
    return N.normal(N.step_key(2024, 1), 0, M, dtype=torch.float64)


def test_moments(draws):
    z = draws
    se = 1 / math.sqrt(M)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    skew = (z**3).mean().item()
    assert abs(skew) < 5 * math.sqrt(6) * se
    kurt = (z**4).mean().item()
    assert abs(kurt - 3) < 5 * math.sqrt(96) * se


@pytest.mark.parametrize("t", [1.0, 2.0, 3.0, 4.0])
def test_tail_frequencies(draws, t):
    p = math.erfc(t / math.sqrt(2))  # P(|z| > t)
    freq = (draws.abs() > t).double().mean().item()
    assert abs(freq - p) < 6 * math.sqrt(p * (1 - p) / M) + 1e-6


def test_each_lane_of_the_quad_is_standard_normal(draws):
    # A pairing bug (cos/sin swapped, or pairs shared) shows up as unequal lanes or correlated lanes.
    lanes = draws.view(-1, 4)
    se = 1 / math.sqrt(lanes.shape[0])
    for j in range(4):
        assert abs(lanes[:, j].mean().item()) < 5 * se
        assert abs(lanes[:, j].var().item() - 1) < 5 * math.sqrt(2) * se
    c = torch.corrcoef(lanes.T)
    off = c - torch.eye(4, dtype=c.dtype)
    assert off.abs().max().item() < 5 * se


def _corr(a, b):
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.parametrize("other", [
    dict(tensor_id=1), dict(stream=2), dict(step=2), dict(seed=2025)])
def test_no_correlation(draws, other):
    seed, step = other.get("seed", 2024), other.get("step", 1)
    z2 = N.normal(N.step_key(seed, step), other.get("tensor_id", 0), M,
                  stream=other.get("stream", 0), dtype=torch.float64)
    assert abs(_corr(draws, z2)) < 5 / math.sqrt(M)
    assert abs(_corr(draws**2, z2**2)) < 5 * math.sqrt(2) / math.sqrt(M) * 2


def test_no_correlation_between_neighbouring_quads(draws):
    assert abs(_corr(draws[:-4], draws[4:])) < 5 / math.sqrt(M)
    assert abs(_corr(draws[:-1], draws[1:])) < 5 / math.sqrt(M)
