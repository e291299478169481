"""The CUDA kernels of the low-rank pass (csrc/cuda/lowrank_kernel.cu) compile for sm_80 and sm_90 with this
machine's nvcc: no local memory, no stack or spills, no FMA contraction (the CPU kernel's bits), vector
global loads/stores of θ; the torch glue (lowrank_cuda.cpp) passes the host compiler.  No GPU needed; the
runs on a GPU are tests/test_cuda_lowrank.py and the low-rank rows of tests/test_backend_conformance.py."""
import re

import pytest

from nvcc_helpers import ARCHS, ROOT, assert_no_spills_or_stack, check_glue_compiles, kernels, needs_nvcc, ptx_fixture

KERNEL = ROOT / "csrc" / "cuda" / "lowrank_kernel.cu"
pytestmark = needs_nvcc
ptx = ptx_fixture(KERNEL)


@pytest.mark.parametrize("arch", ARCHS)
def test_lowrank_kernels_ptx(ptx, arch):
    found = kernels(ptx[arch])
    passes = {n: b for n, b in found.items() if "lowrank_pass_kernel" in n}
    factors = {n: b for n, b in found.items() if "lowrank_factor_kernel" in n}
    assert len(passes) == 3 and len(factors) == 1, sorted(found)  # float32, bfloat16, float16 params
    for name, body in {**passes, **factors}.items():
        assert ".local" not in body, name
        assert not re.search(r"\bfma\.rn\.f32\b", body), name
        assert re.search(r"\badd\.rn\.f32\b", body) and re.search(r"\bmul\.rn\.f32\b", body), name
    for name, body in passes.items():
        vec = r"v2\.(u32|b32)" if "ILi0E" not in name else r"v4\.(f32|b32|u32)"
        assert re.search(r"ld\.global\." + vec, body) and re.search(r"st\.global\." + vec, body), name


def test_lowrank_no_spills_or_stack(tmp_path):
    assert_no_spills_or_stack(KERNEL, tmp_path, 4)


def test_lowrank_glue_compiles_against_torch_headers(tmp_path):
    check_glue_compiles(ROOT / "csrc" / "cuda" / "lowrank_cuda.cpp", tmp_path)
