"""The Triton ZO-Adam kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); PTX checks as
tests/test_triton_aot.py: no local memory, fast sin/cos, vector loads/stores of θ, m and v on the
aligned path, and IEEE (round-to-nearest) sqrt and division."""
import pytest
from aot_helpers import WIDE, compile_cases, local_memory, vector_access

pytest.importorskip("triton")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    return compile_cases("zo_kernels.triton.noise_adam", tmp_path_factory.mktemp("adam_ptx"))


def test_targets_and_no_local_memory(ptx):
    assert len(ptx) == 6
    for name, case in ptx.items():
        text = case["ptx"]
        assert f".target sm_{case['cc']}" in text, name
        assert not local_memory(text), f"{name}: local-memory traffic"
        assert "sin.approx" in text and "cos.approx" in text, name
        assert "sqrt.rn.f32" in text and "div.rn.f32" in text, f"{name}: approximate sqrt/div"


def test_aligned_path_vectorises_param_and_state_access(ptx):
    checked = 0
    for name, case in ptx.items():
        if not case.get("ALIGNED", True):
            continue
        text = case["ptx"]
        w = WIDE[case["OUT"]]
        assert vector_access("ld", w, text), f"{name}: no {w} θ loads"
        assert vector_access("st", w, text), f"{name}: no {w} θ stores"
        # m and v are fp32: 128-bit accesses, at least two loads and two stores per quad
        assert len(vector_access("ld", "v4", text)) >= 2, name
        assert len(vector_access("st", "v4", text)) >= 2, name
        checked += 1
    assert checked == 4
