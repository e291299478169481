"""Parameter-efficient fine-tuning for zo-finetune (`--peft lora|prefix`), through the `peft` package.

The ZO optimizers take any list of trainable tensors, so a peft model needs nothing special: the
adapter's tensors (LoRA A/B, the prefix embedding) and a trainable copy of the classification head
are the parameters; the base weights stay frozen and bit-identical.

- lora: rank-r adapters on the attention projections.  Default targets by architecture: BERT-style
  `query`/`value`, Llama/OPT/Mistral-style `q_proj`/`v_proj`, GPT-2 `c_attn` (override with
  --lora-targets).  The head (`classifier` / `score`) is kept trainable (peft's modules_to_save).
- prefix: prefix tuning (virtual key/value tokens in every layer).  peft needs a model that takes
  past key values; encoders such as BERT under transformers 5.x do not, and the description head
  (a pooled encoder) cannot take them either: that is refused with one clear error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .errors import FinetuneError

PEFT_KINDS = ("lora", "prefix")
HEAD_NAMES = ("classifier", "score")
TARGET_FAMILIES = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",))


@dataclass
class PeftSpec:
    kind: str                                  # "lora" | "prefix"
    rank: int = 8                              # LoRA r
    alpha: float = 16.0                        # LoRA alpha (scale alpha / r)
    targets: Optional[Sequence[str]] = None    # LoRA target module names (None: by architecture)
    virtual_tokens: int = 16                   # prefix length

    def __post_init__(self):
        if self.kind not in PEFT_KINDS:
            raise FinetuneError(f"unknown --peft {self.kind!r}; choose from {', '.join(PEFT_KINDS)}")
        if self.rank < 1 or self.virtual_tokens < 1:
            raise FinetuneError("--lora-rank and --prefix-tokens must be >= 1")
        if not self.alpha > 0:
            raise FinetuneError(f"--lora-alpha must be > 0, got {self.alpha}")


def _peft():
    try:
        import peft
    except ImportError:
        raise FinetuneError("--peft needs the 'peft' package (pip install zo_kernels[peft])") from None
    return peft


def default_lora_targets(net: torch.nn.Module) -> List[str]:
    """The attention projections of the architecture: the first family whose names all occur."""
    leaves = {name.rsplit(".", 1)[-1] for name, mod in net.named_modules()
              if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"}
    for family in TARGET_FAMILIES:
        if all(t in leaves for t in family):
            return list(family)
    raise FinetuneError("--peft lora: cannot tell this model's attention projections "
                        "(none of query/value, q_proj/v_proj, c_attn); pass --lora-targets")


def _head_modules(net: torch.nn.Module) -> List[str]:
    return [h for h in HEAD_NAMES if isinstance(getattr(net, h, None), torch.nn.Module)]


def apply_peft(net: torch.nn.Module, spec: PeftSpec) -> torch.nn.Module:
    """Wrap `net` in a peft model per `spec`; only the adapter and the head's copy require grad."""
    peft = _peft()
    heads = _head_modules(net)
    if spec.kind == "lora":
        targets = list(spec.targets) if spec.targets else default_lora_targets(net)
        config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets,
                                 modules_to_save=heads or None)
        try:
            model = peft.get_peft_model(net, config)
        except ValueError as e:
            raise FinetuneError(f"--peft lora: {str(e).strip().splitlines()[0]}") from None
    else:
        if not hasattr(net, "base_model_prefix") or not hasattr(net.config, "num_hidden_layers"):
            raise FinetuneError(f"--peft prefix needs a transformers model that takes past key values; "
                                f"{type(net).__name__} does not (use --peft lora, or --head fresh with a "
                                f"causal LM)")
        config = peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=spec.virtual_tokens)
        model = peft.get_peft_model(net, config)
        _probe_prefix(model)
    model.eval()
    return model


def _probe_prefix(model) -> None:
    """peft accepts the config for any model and fails at the first forward; fail here instead."""
    ids = torch.ones((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (ValueError, RuntimeError, TypeError) as e:
        # peft 0.21 raises ValueError for a model without past key values; peft 0.22 lets the forward fail
        # on shapes (RuntimeError): either way this model cannot take a prefix.
        raise FinetuneError(f"--peft prefix: this model cannot take a prefix ({str(e).strip().splitlines()[0]}); "
                            f"use --peft lora") from None


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
