"""Shared pieces of the nvcc tests (test_nvcc_compile.py, test_nvcc_adam.py): finding nvcc, the flags
setup.py gives it, compiling a .cu file to PTX per architecture or to an object with ptxas's resource
report, splitting PTX into kernels, and the syntax check of a torch glue file with the host compiler."""
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHS = ("80", "90")
# The flags setup.py gives nvcc for the .cu files.
FLAGS = ["-std=c++17", "-O3", "--fmad=false"]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


def run_nvcc(args):
    out = subprocess.run([NVCC, *FLAGS, *args], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"nvcc {' '.join(args)} failed:\n{out.stderr[-4000:]}"
    return out


def compile_ptx(kernel, tmp):
    """{arch: PTX text} of `kernel` for every architecture (compiled in parallel)."""
    procs = {}
    for arch in ARCHS:
        path = tmp / f"{kernel.stem}_sm{arch}.ptx"
        procs[arch] = (path, subprocess.Popen([NVCC, *FLAGS, f"-arch=sm_{arch}", "-ptx", str(kernel), "-o", str(path)],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    texts = {}
    for arch, (path, proc) in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"nvcc -ptx sm_{arch} failed:\n{err[-4000:]}"
        texts[arch] = path.read_text()
    return texts


def resource_usage(kernel, tmp):
    """ptxas --resource-usage report of `kernel` compiled to one object for every architecture."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    obj = tmp / f"{kernel.stem}.o"
    out = run_nvcc([*gencode, "--resource-usage", "-c", str(kernel), "-o", str(obj)])
    assert obj.stat().st_size > 0
    return out.stdout + out.stderr


def ptx_fixture(kernel):
    """A module-scoped fixture: {arch: PTX text} of `kernel` (compile_ptx)."""
    @pytest.fixture(scope="module")
    def ptx(tmp_path_factory):
        return compile_ptx(kernel, tmp_path_factory.mktemp(f"{kernel.stem}_ptx"))
    return ptx


def assert_no_spills_or_stack(kernel, tmp, entries):
    """ptxas reports `entries` kernels per architecture, none with a stack frame or spills."""
    usage = resource_usage(kernel, tmp)
    found = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", usage)
    assert len(found) == entries * len(ARCHS) and all(f == ("0", "0", "0") for f in found), usage


def kernels(ptx_text):
    """{mangled kernel name: its PTX body}."""
    parts = re.split(r"\.visible \.entry |\.entry ", ptx_text)[1:]
    return {p.split("(", 1)[0]: p for p in parts}


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


def check_glue_compiles(source, tmp_path):
    """`source` (a torch glue .cpp of the CUDA ops) passes the host compiler's syntax check.

    A CPU-only torch ships c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h;
    a stub stands in for it (it only sets build macros)."""
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
            f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}", f"-I{tmp_path}", str(source)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
