"""The Triton ZO-Adam kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); PTX checks as
tests/test_triton_aot.py: no local memory, fast sin/cos, vector loads/stores of θ, m and v on the
aligned path, IEEE (round-to-nearest) sqrt and division, and in the ±1 case no sin/cos and no FMA."""
import pytest

from aot_helpers import aligned_cases, check_targets_and_no_local_memory, module_ptx, vector_access

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

ptx = module_ptx("zo_kernels.triton.noise_adam", "adam_ptx")


def test_targets_and_no_local_memory(ptx):
    check_targets_and_no_local_memory(ptx, 8)
    for name, case in ptx.items():
        text = case["ptx"]
        if case.get("RADEMACHER"):   # g = Σ c_j s_j: no transcendental, and no FMA (the reference's bits)
            assert "sin." not in text and "lg2." not in text and "fma.rn.f32" not in text, name
        else:
            assert "sin.approx" in text and "cos.approx" in text, name
        assert "sqrt.rn.f32" in text and "div.rn.f32" in text, f"{name}: approximate sqrt/div"


def test_aligned_path_vectorises_param_and_state_access(ptx):
    for name, case in aligned_cases(ptx, 6):
        # m and v are fp32: 128-bit accesses, at least two loads and two stores per quad
        assert len(vector_access("ld", "v4", case["ptx"])) >= 2, name
        assert len(vector_access("st", "v4", case["ptx"])) >= 2, name
