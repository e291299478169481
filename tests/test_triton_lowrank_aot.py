"""The Triton low-rank kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); PTX checks as
tests/test_triton_aot.py: the target, no local memory (spills), and θ's loads and stores vectorised on
the aligned path (one quad: v4 for fp32, v2 for bf16)."""
import pytest
from aot_helpers import WIDE, compile_cases, local_memory, vector_access

pytest.importorskip("triton")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    return compile_cases("zo_kernels.triton.lowrank", tmp_path_factory.mktemp("lowrank_ptx"))


def test_targets_and_no_local_memory(ptx):
    assert len(ptx) == 10
    for name, case in ptx.items():
        text = case["ptx"]
        assert f".target sm_{case['cc']}" in text, name
        assert not local_memory(text), f"{name}: local-memory traffic"


def test_aligned_path_vectorises_theta(ptx):
    checked = 0
    for name, case in ptx.items():
        if not case.get("ALIGNED", True):
            continue
        w = WIDE[case["OUT"]]
        assert vector_access("ld", w, case["ptx"]), f"{name}: no {w} θ loads"
        assert vector_access("st", w, case["ptx"]), f"{name}: no {w} θ stores"
        checked += 1
    assert checked == 8
