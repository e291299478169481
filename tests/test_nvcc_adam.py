"""The CUDA kernel of the fused ZO-Adam pass (csrc/cuda/adam_kernel.cu) compiles for sm_80 and sm_90
with this machine's nvcc: no local memory, no stack or spills, no FMA contraction, IEEE division and
sqrt, vector global loads/stores of θ, m and v; its torch glue passes the host compiler.  No GPU
needed (tests/test_cuda_native.py-style runs on a GPU are still to do)."""
import re

import pytest

from nvcc_helpers import ARCHS, ROOT, assert_no_spills_or_stack, check_glue_compiles, kernels, needs_nvcc, ptx_fixture

KERNEL = ROOT / "csrc" / "cuda" / "adam_kernel.cu"
pytestmark = needs_nvcc
ptx = ptx_fixture(KERNEL)


@pytest.mark.parametrize("arch", ARCHS)
def test_adam_kernels_ptx(ptx, arch):
    adam = {n: b for n, b in kernels(ptx[arch]).items() if "noise_adam_kernel" in n}
    assert len(adam) == 3, sorted(adam)       # float32, bfloat16, float16 params
    for name, body in adam.items():
        assert ".local" not in body, name
        assert not re.search(r"\bfma\.rn\.f32\b", body), name
        assert re.search(r"\bdiv\.rn\.f32\b", body) and re.search(r"\bsqrt\.rn\.f32\b", body), name
        # m and v (float32): 16-byte accesses; θ: 16 bytes (fp32) or 8 bytes (bf16/fp16)
        assert len(re.findall(r"ld\.global\.v4\.(f32|b32|u32)", body)) >= 2, name
        assert len(re.findall(r"st\.global\.v4\.(f32|b32|u32)", body)) >= 2, name
        if "ILi0E" not in name:
            assert re.search(r"ld\.global\.v2\.(u32|b32)", body) and re.search(r"st\.global\.v2\.(u32|b32)", body)


def test_adam_no_spills_or_stack(tmp_path):
    assert_no_spills_or_stack(KERNEL, tmp_path, 3)


def test_adam_glue_compiles_against_torch_headers(tmp_path):
    check_glue_compiles(ROOT / "csrc" / "cuda" / "adam_cuda.cpp", tmp_path)
