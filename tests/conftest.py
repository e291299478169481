import os

import torch

# Triton picks the interpreter when kernels are defined, so this must precede any zo_kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
