"""bench_noise.py --adam runs, times every instruction-set build of the CPU pass beside the baselines in one
process, and writes its CSV with the ratios."""
import csv
import importlib.util

import pytest

import zo_kernels
from zo_kernels.native import cpu_isas

from helpers import load_script


@pytest.mark.skipif("cpu" not in zo_kernels.available_backends(), reason="no native CPU backend")
def test_bench_noise_adam_rows(tmp_path):
    load_script("benchmarks/bench_noise.py", "_bench_noise").main(
        ["--adam", "--device", "cpu", "--dtypes", "float32,bfloat16", "--sizes", "1000,3001", "--keys", "2",
         "--threads", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "bench_noise_adam.csv")))
    methods = {f"adam_cpu_{isa}" for isa in cpu_isas()} | {"adam_reference", "torch_adam"}
    assert {(r["dtype"], r["numel"], r["method"]) for r in rows} == {
        (d, n, m) for d in ("float32", "bfloat16") for n in ("1000", "3001") for m in methods}
    for r in rows:
        assert float(r["ns_per_element"]) > 0
        want = float(r["seconds"]) / next(float(b["seconds"]) for b in rows if b["method"] == "adam_cpu_base"
                                          and (b["dtype"], b["numel"]) == (r["dtype"], r["numel"]))
        assert float(r["speedup_vs_cpu_base"]) == pytest.approx(1 / want)
        assert float(r["speedup_vs_reference"]) > 0 and float(r["speedup_vs_torch_adam"]) > 0
    assert (tmp_path / "bench_noise_adam.png").exists() or importlib.util.find_spec("matplotlib") is None
