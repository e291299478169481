"""zo_kernels: pip install --no-build-isolation -e .  (install torch first).

Builds the native extension zo_kernels._C from csrc/ with torch.utils.cpp_extension (ninja):
the CPU kernel always; the CUDA kernel too when torch has CUDA and nvcc is found (CUDA_HOME).
Set ZO_KERNELS_NO_CUDA=1 to build the CPU part only. Without torch at build time (or if the
extension is absent at run time) the package still works through the PyTorch reference.
"""
import os
import sys

from setuptools import find_packages, setup

CPU_SOURCES = [
    "csrc/ops.cpp",
    "csrc/cpu/noise_cpu.cpp",
    "csrc/cpu/kernel_base.cpp",
    "csrc/cpu/kernel_avx2.cpp",
    "csrc/cpu/kernel_avx512.cpp",
    "csrc/cpu/adam_cpu.cpp",
    "csrc/cpu/lowrank_cpu.cpp",    # the low-rank pass (zo_kernels/lowrank.py)
]
CUDA_SOURCES = [
    "csrc/cuda/noise_kernel.cu",   # the kernels: philox.h and CUDA headers only
    "csrc/cuda/noise_cuda.cpp",    # torch glue and the CUDA dispatch-key registration
    "csrc/cuda/adam_kernel.cu",    # the fused ZO-Adam pass (csrc/adam.h)
    "csrc/cuda/adam_cuda.cpp",
]
# -ffp-contract=off: no fused multiply-adds, so every instruction set (and the CUDA kernel,
# which uses __fmul_rn / __fadd_rn) computes the same bits; -fno-math-errno lets sqrt vectorise.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-DZO_WITH_CUDA"]


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install, the reference backend runs
        print("zo_kernels: torch is not importable at build time; skipping the native extension "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}
    cxx = list(CXX_FLAGS)
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP inlined from the ATen headers; the process shares torch's libgomp.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("ZO_KERNELS_NO_CUDA", "0") != "1")
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "zo_kernels._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DZO_WITH_CUDA"], "nvcc": NVCC_FLAGS},
            extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension(
            "zo_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="zo_kernels",
    version="0.1.0",
    description="Fused zeroth-order noise kernels and ZO optimizers (MeZO, MeZO-SVRG) for PyTorch",
    packages=find_packages(include=["zo_kernels", "zo_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=4.40", "accelerate>=0.26"],
        "peft": ["peft>=0.13", "transformers>=4.40"],
        "datasets": ["datasets>=2.19"],
        "dev": ["pytest"],
    },
    entry_points={"console_scripts": ["zo-finetune=zo_kernels.finetune.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
