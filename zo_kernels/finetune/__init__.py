"""zo-finetune: the main job.  Zeroth-order fine-tuning (MeZO, MeZO-SVRG) vs first-order
baselines on a Hugging Face sequence classifier, with step-time and peak-memory numbers.

    zo-finetune --help        or        python -m zo_kernels.finetune --help
"""
from .errors import FinetuneError


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main", "FinetuneError"]
