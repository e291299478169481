"""The CUDA kernel of the fused ZO-Adam pass (csrc/cuda/adam_kernel.cu) compiles for sm_80 and sm_90
with this machine's nvcc: no local memory, no stack or spills, no FMA contraction, IEEE division and
sqrt, vector global loads/stores of θ, m and v; its torch glue passes the host compiler.  No GPU
needed (tests/test_cuda_native.py-style runs on a GPU are still to do)."""
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
from test_nvcc_compile import ARCHS, FLAGS, NVCC, _cuda_include, _kernels, _torch_include

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL = ROOT / "csrc" / "cuda" / "adam_kernel.cu"
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adam_ptx")
    texts = {}
    for arch in ARCHS:
        path = tmp / f"adam_sm{arch}.ptx"
        out = subprocess.run([NVCC, *FLAGS, f"-arch=sm_{arch}", "-ptx", str(KERNEL), "-o", str(path)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-4000:]
        texts[arch] = path.read_text()
    return texts


@pytest.mark.parametrize("arch", ARCHS)
def test_adam_kernels_ptx(ptx, arch):
    kernels = {n: b for n, b in _kernels(ptx[arch]).items() if "noise_adam_kernel" in n}
    assert len(kernels) == 3, sorted(kernels)       # float32, bfloat16, float16 params
    for name, body in kernels.items():
        assert ".local" not in body, name
        assert not re.search(r"\bfma\.rn\.f32\b", body), name
        assert re.search(r"\bdiv\.rn\.f32\b", body) and re.search(r"\bsqrt\.rn\.f32\b", body), name
        # m and v (float32): 16-byte accesses; θ: 16 bytes (fp32) or 8 bytes (bf16/fp16)
        assert len(re.findall(r"ld\.global\.v4\.(f32|b32|u32)", body)) >= 2, name
        assert len(re.findall(r"st\.global\.v4\.(f32|b32|u32)", body)) >= 2, name
        if "ILi0E" not in name:
            assert re.search(r"ld\.global\.v2\.(u32|b32)", body) and re.search(r"st\.global\.v2\.(u32|b32)", body)


def test_adam_no_spills_or_stack(tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    out = subprocess.run([NVCC, *FLAGS, *gencode, "--resource-usage", "-c", str(KERNEL), "-o", str(tmp_path / "a.o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    usage = out.stdout + out.stderr
    found = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", usage)
    assert len(found) == 3 * len(ARCHS) and all(f == ("0", "0", "0") for f in found), usage


def test_adam_glue_compiles_against_torch_headers(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _torch_include()
    cuda_inc = _cuda_include()
    if cxx is None or inc is None or cuda_inc is None:
        pytest.skip("needs a host C++ compiler, torch's headers and the CUDA runtime headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    args = [cxx, "-std=c++17", "-fsyntax-only", "-DZO_WITH_CUDA", *[f"-I{p}" for p in inc], f"-I{cuda_inc}",
            f"-I{sysconfig.get_paths()['include']}", f"-I{tmp_path}", str(ROOT / "csrc" / "cuda" / "adam_cuda.cpp")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
