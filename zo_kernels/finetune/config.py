"""`TrainConfig`: the settings of one training run — the run-wide ones as fields, each method's
knobs (zo_kernels.finetune.registry) in `options`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from .errors import FinetuneError
from .registry import KNOBS

OBJECTIVES = ("loss", "accuracy")


@dataclass
class TrainConfig:
    batch_size: int = 16
    queries: int = 19200                 # budget per ZO method (one query = one example's forward pass)
    eps: float = 1e-3
    anneal: bool = False
    lr_schedule: str = "constant"    # learning-rate factor over the budget: constant, linear or cosine (to 0)
    kappa: float = 1.05
    alpha: float = 5.0
    weight_decay: float = 0.0
    evals: int = 8                   # evaluation points after the start (test acc + train loss)
    eval_train: int = 512            # training examples in the eval points' train loss (0: all)
    eval_batch: int = 64
    micro_batch: int = 64            # micro-batch of the large-batch / evaluation forward passes
    objective: str = "loss"          # ZO methods: "loss" (cross-entropy) or "accuracy" (minibatch error rate)
    seed: int = 0
    backend: Optional[str] = None
    rounding: str = "nearest"
    record: bool = False             # ZO optimizers keep their trajectory
    nan_policy: str = "raise"
    device: str = "cpu"
    dtype: str = "float32"
    distributed: bool = False        # data parallel under torchrun (zo_kernels.distributed)
    quantize: Optional[str] = None   # quantized base: "nf4" | "int8" (zo_kernels.finetune.quantize)
    train: str = "weights"           # "weights" (--peft/--partial/--bitfit choose) or "scales" (QZO)
    clip_dd: Optional[float] = None  # ZO: clip each two-point directional derivative to [-clip_dd, clip_dd]
    options: Dict[str, Any] = field(default_factory=dict)   # knob name -> value given (None: not given)

    def option(self, name: str):
        """Knob `name`'s value: as given, else derived by its rule, else its default."""
        if name not in KNOBS:
            raise FinetuneError(f"no method declares a knob named {name!r}")
        k = KNOBS[name]
        v = self.options.get(name)
        if v is not None:
            return v
        return k.derive(self) if k.derive is not None else k.default

    @classmethod
    def from_args(cls, a, **run) -> "TrainConfig":
        """The config of `zo-finetune`'s parsed arguments `a`; `run` sets the fields the CLI works
        out itself (seed, queries, device, distributed)."""
        names = {f.name for f in fields(cls)} - {"options"}
        given = {n: getattr(a, n) for n in names if hasattr(a, n)}
        return cls(**{**given, **run, "options": {n: getattr(a, n, None) for n in KNOBS}})


def query_budget(a) -> int:
    """The ZO query budget of `zo-finetune`'s parsed arguments `a`: --queries, else --steps MeZO steps
    (2 * --batch-size queries each), else TrainConfig's default."""
    if a.queries is not None:
        return a.queries
    return a.steps * 2 * a.batch_size if a.steps else TrainConfig().queries
