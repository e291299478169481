"""benchmarks/bench_zo_bench.py at a tiny budget: every method spends the same queries (within one
step), the CSV is written, and the state column is what each method keeps."""
import pytest

from helpers import load_script

pytest.importorskip("sklearn")


def test_equal_queries_and_state(tmp_path):
    mod = load_script("benchmarks/bench_zo_bench.py", "bench_zo_bench")
    rows = mod.main(["--queries", "1000", "--seeds", "1", "--out", str(tmp_path), "--methods",
                     "mezo,cons,mmt-dense,mmt-seeded,adam,fwdgrad,fo-sgd"])
    assert (tmp_path / "bench_zo_bench.csv").exists()
    by = {r["method"]: r for r in rows}
    assert all(1000 - 5 * 32 < r["queries"] <= 1000 for r in rows)
    assert by["cons"]["steps"] * 5 * 32 == by["cons"]["queries"]
    assert by["mmt-dense"]["state_x_weights"] == 1.0 and by["adam"]["state_x_weights"] == 2.0
    assert by["mmt-seeded"]["state_x_weights"] == 0.0 and by["mezo"]["state_x_weights"] == 0.0
