"""The low-rank benchmarks run, write their CSV, and (bench_lozo_forward) the in-forward way computes
the same losses and update as the fused passes."""
import csv

import pytest
import torch

import zo_kernels

from helpers import load_script


def _load(name):
    return load_script(f"benchmarks/{name}.py", f"_bench_{name}")


@pytest.mark.skipif("cpu" not in zo_kernels.available_backends(), reason="no native CPU backend")
def test_bench_noise_lowrank_rows(tmp_path):
    _load("bench_noise").main(["--lowrank", "--device", "cpu", "--dtypes", "float32", "--shapes", "64x48",
                               "--ranks", "1,4", "--threads", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "bench_noise_lowrank.csv")))
    methods = ["lozo_uvt", "lowrank_cpu", "fullrank_cpu"]
    if zo_kernels.backends.get("cpu").notes.get("isa", "base") != "base":
        methods.append("lowrank_cpu_base")           # the baseline build, timed beside the wider one
    assert {(r["rank"], r["method"]) for r in rows} == {(r, m) for r in ("1", "4") for m in methods}
    assert all(float(r["ns_per_element"]) > 0 for r in rows)


def test_in_forward_perturbation_matches_the_passes():
    bench = _load("bench_lozo_forward")
    from zo_kernels.noise import step_key
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g)
    wa, wb = bench.make(24, 3), bench.make(24, 3)
    la = bench.step_passes(wa, x, y, step_key(1, 2), step_key(1, 0), 3, 1e-2, 1e-2)
    lb = bench.step_in_forward(wb, x, y, step_key(1, 2), step_key(1, 0), 3, 1e-2, 1e-2)
    assert abs(la[0] - la[1]) > 1e-6                     # the perturbation changes the loss
    assert max(abs(p - q) for p, q in zip(la, lb)) <= 1e-5 * abs(la[0])
    for a, b in zip(wa, wb):                             # same update (passes: +μ −2μ +μ round trip)
        assert (a - b).abs().max() <= 1e-5
