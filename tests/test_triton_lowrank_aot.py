"""The Triton low-rank kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); PTX checks as
tests/test_triton_aot.py: the target, no local memory (spills), and θ's loads and stores vectorised on
the aligned path (one quad: v4 for fp32, v2 for bf16)."""
import pytest

from aot_helpers import aligned_cases, check_targets_and_no_local_memory, module_ptx

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

ptx = module_ptx("zo_kernels.triton.lowrank", "lowrank_ptx")


def test_targets_and_no_local_memory(ptx):
    check_targets_and_no_local_memory(ptx, 10)


def test_aligned_path_vectorises_theta(ptx):
    aligned_cases(ptx, 8)
