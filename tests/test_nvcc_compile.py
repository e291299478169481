"""The CUDA kernel (csrc/cuda/noise_kernel.cu) compiles for sm_80 and sm_90 with this machine's nvcc, and
its code has no local-memory traffic, no FMA contraction, and vector global loads/stores.  No GPU needed:
the kernel file includes only csrc/philox.h, csrc/restore.h and CUDA headers (the torch glue is
noise_cuda.cpp, syntax-checked here with the host compiler against torch's headers).

Both the ordinary kernels (noise_axpy_kernel<P, D>) and the exact-restore kernels
(noise_axpy_exact_kernel<P>, the rules of csrc/restore.h) are checked."""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL = ROOT / "csrc" / "cuda" / "noise_kernel.cu"
ARCHS = ("80", "90")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
# The flags setup.py gives nvcc for this file.
FLAGS = ["-std=c++17", "-O3", "--fmad=false"]


def _run(args):
    out = subprocess.run([NVCC, *FLAGS, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"nvcc {' '.join(args)} failed:\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """PTX of every kernel, per architecture (compiled in parallel)."""
    tmp = tmp_path_factory.mktemp("ptx")
    procs = {}
    for arch in ARCHS:
        path = tmp / f"noise_kernel_sm{arch}.ptx"
        procs[arch] = (path, subprocess.Popen([NVCC, *FLAGS, f"-arch=sm_{arch}", "-ptx", str(KERNEL), "-o", str(path)],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    texts = {}
    for arch, (path, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"nvcc -ptx sm_{arch} failed:\n{err[-4000:]}"
        texts[arch] = path.read_text()
    return texts


def _kernels(ptx_text):
    """{mangled kernel name: its PTX body}."""
    parts = re.split(r"\.visible \.entry |\.entry ", ptx_text)[1:]
    return {p.split("(", 1)[0]: p for p in parts}


@pytest.fixture(scope="module")
def resource_usage(tmp_path_factory):
    """ptxas --resource-usage report of an object compiled for every architecture."""
    tmp = tmp_path_factory.mktemp("obj")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    out = _run([*gencode, "--resource-usage", "-c", str(KERNEL), "-o", str(tmp / "noise_kernel.o")])
    assert (tmp / "noise_kernel.o").stat().st_size > 0
    return out.stdout + out.stderr


def test_compiles_for_sm80_and_sm90(resource_usage):
    usage = resource_usage
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", usage)
    assert spills, usage
    assert all(st == "0" and ld == "0" for st, ld in spills), f"register spills:\n{usage}"
    frames = re.findall(r"(\d+) bytes stack frame", usage)
    assert all(f == "0" for f in frames), f"stack frames:\n{usage}"


@pytest.mark.parametrize("arch", ARCHS)
def test_ptx_no_local_memory_and_no_fma(ptx, arch):
    text = ptx[arch]
    assert "ld.local" not in text and "st.local" not in text
    # __fmul_rn / __fadd_rn keep the math bit-identical to the CPU kernel: no contraction.
    assert not re.search(r"\bfma\.rn\.f32\b", text)


@pytest.mark.parametrize("arch", ARCHS)
def test_ptx_vector_global_access(ptx, arch):
    kernels = _kernels(ptx[arch])
    axpy = {name: body for name, body in kernels.items() if "noise_axpy_kernel" in name}
    assert len(axpy) == 12, sorted(kernels)  # 3 param dtypes x (3 dense dtypes + none)
    for name, body in axpy.items():
        p_dtype = int(re.search(r"noise_axpy_kernelILi(\d)E", name).group(1))
        if p_dtype == 0:  # float32: one 16-byte access per quad
            assert re.search(r"ld\.global\.v4\.(f32|b32|u32)", body), name
            assert re.search(r"st\.global\.v4\.(f32|b32|u32)", body), name
        else:  # bf16 / fp16: one 8-byte access per quad
            assert re.search(r"ld\.global\.v2\.(u32|b32)", body), name
            assert re.search(r"st\.global\.v2\.(u32|b32)", body), name


def _exact_kernels(ptx_text):
    return {name: body for name, body in _kernels(ptx_text).items() if "noise_axpy_exact_kernel" in name}


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_kernels_no_local_memory_no_fma_vector_access(ptx, arch):
    exact = _exact_kernels(ptx[arch])
    assert len(exact) == 3, sorted(_kernels(ptx[arch]))  # float32, bfloat16, float16
    for name, body in exact.items():
        # The candidate search keeps its per-element state in registers.
        assert "ld.local" not in body and "st.local" not in body and ".local" not in body, name
        # Exactness: the inverse re-applies the forward rounding with the same (uncontracted) operations.
        assert not re.search(r"\bfma\.rn\.f32\b", body), name
        assert re.search(r"\badd\.rn\.f32\b", body) and re.search(r"\bmul\.rn\.f32\b", body), name
        p_dtype = int(re.search(r"noise_axpy_exact_kernelILi(\d)E", name).group(1))
        vec = r"v4\.(f32|b32|u32)" if p_dtype == 0 else r"v2\.(u32|b32)"
        assert re.search(r"ld\.global\." + vec, body), name
        assert re.search(r"st\.global\." + vec, body), name


def test_exact_kernels_no_spills_or_stack(resource_usage):
    usage = resource_usage
    # ptxas prints, per entry: "Compiling entry function '<name>' for 'sm_XX'", then its properties.
    blocks = re.split(r"Compiling entry function ", usage)[1:]
    exact = [b for b in blocks if "noise_axpy_exact_kernel" in b.split("\n", 1)[0]]
    assert len(exact) == 3 * len(ARCHS), usage
    for b in exact:
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", b)
        assert m and m.groups() == ("0", "0", "0"), b


def _torch_include():
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return None
    return cpp_extension.include_paths()


def _cuda_include():
    nvcc = pathlib.Path(NVCC).resolve()
    for inc in (nvcc.parent.parent / "include", pathlib.Path("/usr/local/cuda/include")):
        if (inc / "cuda_runtime_api.h").exists():
            return inc
    return None


def test_cuda_glue_compiles_against_torch_headers(tmp_path):
    """noise_cuda.cpp (the torch side of the CUDA ops, exact form included) passes the host compiler.

    A CPU-only torch ships c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h;
    a stub stands in for it (it only sets build macros)."""
    import sysconfig

    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _torch_include()
    cuda_inc = _cuda_include()
    if cxx is None or inc is None or cuda_inc is None:
        pytest.skip("needs a host C++ compiler, torch's headers and the CUDA runtime headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    # The generated header of a CUDA torch wins where it exists: the stub directory comes last.
    args = [cxx, "-std=c++17", "-fsyntax-only", "-DZO_WITH_CUDA", *[f"-I{p}" for p in inc],
            f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}", f"-I{tmp_path}",
            str(ROOT / "csrc" / "cuda" / "noise_cuda.cpp")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
