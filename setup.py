"""zo_kernels: pip install --no-build-isolation -e .  (install torch first).

Builds the native extension zo_kernels._C from csrc/ with torch.utils.cpp_extension (ninja):
the CPU kernel always; the CUDA kernel too when torch has CUDA and nvcc is found (CUDA_HOME).
On a CUDA build host without a visible GPU (CI, docker builds) and without TORCH_CUDA_ARCH_LIST,
the CUDA kernel is built for DEFAULT_CUDA_ARCHS.

Environment:
  ZO_KERNELS_NO_CUDA=1         build the CPU part only.
  ZO_KERNELS_REQUIRE_NATIVE=1  a failed or skipped extension build fails the install (non-zero exit).
  TORCH_CUDA_ARCH_LIST         the CUDA architectures (torch's own variable).
Otherwise a failed build ends with a warning banner and the package still works through the
PyTorch reference (zo_kernels warns at run time which backend is missing and why).  pip shows a
successful build's output only with -v, hence ZO_KERNELS_REQUIRE_NATIVE=1 in scripts/setup_env.sh.
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
    "csrc/cuda/lowrank_kernel.cu", # the low-rank pass (zo_kernels/lowrank.py)
    "csrc/cuda/lowrank_cuda.cpp",
]
# -ffp-contract=off: no fused multiply-adds, so every instruction set (and the CUDA kernel,
# which uses __fmul_rn / __fadd_rn) computes the same bits; -fno-math-errno lets sqrt vectorise.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-DZO_WITH_CUDA"]
# A100 and H100/H200 machine code, plus PTX that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _require_native() -> bool:
    return os.environ.get("ZO_KERNELS_REQUIRE_NATIVE", "0") == "1"


def _no_native(reason: str) -> None:
    """The extension will not be built: fatal under ZO_KERNELS_REQUIRE_NATIVE=1, else a banner."""
    banner = "\n".join(["", "=" * 78, f"zo_kernels: the native extension zo_kernels._C was NOT built: {reason}",
                        "The package falls back to the PyTorch reference (slow).  Set ZO_KERNELS_REQUIRE_NATIVE=1",
                        "to make this an error.", "=" * 78, ""])
    if _require_native():
        # SystemExit, not an Exception: setuptools' editable install swallows exceptions from build_ext.
        raise SystemExit(f"zo_kernels: ZO_KERNELS_REQUIRE_NATIVE=1 and the native extension was not built: "
                         f"{reason}")
    print(banner, file=sys.stderr)


def _cuda_archs(torch) -> None:
    """Without a visible GPU torch cannot pick the architectures (and fails the build): set a default."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    if torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(f"zo_kernels: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CUDA kernel for "
              f"{DEFAULT_CUDA_ARCHS}", file=sys.stderr)


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install, the reference backend runs
        _no_native("torch is not importable at build time (install torch first, then "
                   "pip install --no-build-isolation)")
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
        _cuda_archs(torch)
        ext = cpp_extension.CUDAExtension(
            "zo_kernels._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DZO_WITH_CUDA"], "nvcc": NVCC_FLAGS},
            extra_link_args=link)
    else:
        if torch.version.cuda is not None and os.environ.get("ZO_KERNELS_NO_CUDA", "0") != "1":
            print("zo_kernels: torch has CUDA but nvcc was not found (set CUDA_HOME): building the CPU "
                  "kernel only", file=sys.stderr)
        ext = cpp_extension.CppExtension(
            "zo_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler/toolchain failure is reported the same way
                _no_native(f"{type(e).__name__}: {e}")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()

setup(
    name="zo_kernels",
    version="0.1.0",
    description="Fused zeroth-order noise kernels and ZO optimizers (MeZO, MeZO-SVRG) for PyTorch",
    packages=find_packages(include=["zo_kernels", "zo_kernels.*"]),
    python_requires=">=3.10",
    # The oldest versions the suite has passed on (torch 2.11 / triton 3.6: the lent GPU machine's).
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=4.40", "accelerate>=0.26"],
        "peft": ["peft>=0.13", "transformers>=4.40"],
        "datasets": ["datasets>=2.19"],
        # --quantize nf4 / int8 (docs/quantized.md); install with --no-deps next to a pinned torch
        "quant": ["bitsandbytes>=0.50", "torchao>=0.18"],
        "dev": ["pytest"],
    },
    entry_points={"console_scripts": ["zo-finetune=zo_kernels.finetune.cli:main",
                                     "zo-replay=zo_kernels.seedlog.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
