"""zo_kernels: pip install --no-build-isolation -e .  (install torch first)."""
from setuptools import find_packages, setup

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
        "dev": ["pytest"],
    },
    entry_points={"console_scripts": ["zo-finetune=zo_kernels.finetune.cli:main"]},
)
