"""What a report or benchmark says about the machine it ran on, and quiet model loading."""
from __future__ import annotations

import logging
import platform
import warnings


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (a fresh classification head is expected)."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # transformers' quantizers import torchao and bitsandbytes whenever they are installed (zo_kernels[quant]),
    # and those log library-load and deprecation lines on every model load, quantized or not.
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
