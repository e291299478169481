"""zo-finetune on a quantized base (docs/quantized.md): `--quantize nf4|int8` quantizes the encoder's
linear layers after loading (zo_kernels.quant; the head stays float), and `--train` chooses what ZO
trains over the frozen integer codes: `--peft lora` adapters (`--train weights`, the default), or
`--train scales` (QZO): the quantization scales plus every bias, normalisation weight and the head.
`--clip-dd C` clips each two-point directional derivative to [−C, C] (QZO's stabiliser)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .. import quant
from .errors import FinetuneError

TRAIN_SETS = ("weights", "scales")


def check_args(a, methods: List[str]) -> None:
    """The quantization options against each other and the rest (one line each)."""
    from .registry import METHODS

    if a.train not in TRAIN_SETS:
        raise FinetuneError(f"--train {a.train!r}: choose from {', '.join(TRAIN_SETS)}")
    if a.clip_dd is not None:
        if not a.clip_dd > 0:
            raise FinetuneError(f"--clip-dd must be > 0, got {a.clip_dd}")
        bad = [m for m in methods if METHODS[m].kind != "zo" or METHODS[m].differentiates]
        if bad:
            raise FinetuneError(f"--clip-dd clips two-point ZO estimates; {', '.join(bad)} computes no such estimate")
    if a.train == "scales":
        if a.quantize is None:
            raise FinetuneError("--train scales trains quantization scales: give --quantize nf4 or int8")
        if a.peft is not None or a.partial is not None or a.bitfit:
            raise FinetuneError("--train scales chooses the trainable weights itself: drop --peft/--partial/--bitfit")
        grad = [m for m in methods if METHODS[m].kind != "zo" or METHODS[m].differentiates]
        if grad:
            raise FinetuneError(f"--train scales: {', '.join(grad)} needs a derivative through the quantized "
                                f"layers, which bitsandbytes/torchao do not give for the scales; use ZO methods")
    if a.quantize is None:
        return
    if a.train == "weights" and a.peft != "lora":
        raise FinetuneError(f"--quantize {a.quantize} freezes the quantized weights: train LoRA adapters over them "
                            f"(--peft lora) or the scales (--train scales)")
    if a.dtype != "float32":
        raise FinetuneError(f"--quantize {a.quantize} computes in float32: drop --dtype {a.dtype}")
    if a.save_log:
        raise FinetuneError("--save-log: zo-replay rebuilds float models only; drop --save-log with --quantize")
    ok, why = quant.available(a.quantize)
    if not ok:
        raise FinetuneError(f"--quantize {a.quantize}: {why}")


def quantize_model(net: torch.nn.Module, kind: Optional[str], device: str) -> Optional[dict]:
    """Quantize `net` in place (None: leave it float); what was done, for results.json."""
    if kind is None:
        return None
    try:
        n = quant.quantize_(net, kind)      # on the layers' own device
    except quant.QuantError as e:
        raise FinetuneError(f"--quantize {kind}: {e}") from None
    return {"kind": kind, "layers": n}


def scale_trainable(net: torch.nn.Module) -> List[torch.nn.Parameter]:
    """QZO's trainable set: every quantized layer's scales, plus the biases, normalisation weights and
    head (BitFit's set, which the codes do not cover); everything else is frozen."""
    from .model import _is_bitfit

    scales = {id(p) for _, p in quant.scale_parameters(net)}
    chosen = []
    for name, p in net.named_parameters():
        on = id(p) in scales or (p.is_floating_point() and _is_bitfit(name) and name.rsplit(".", 1)[-1] != quant.SCALE_NAME)
        p.requires_grad_(on)
        if on:
            chosen.append(p)
    return chosen


def summary(net: torch.nn.Module, done: Optional[dict], train: str) -> dict:
    """results.json's "quantization" entry: kind, layers, what trains, the bytes of codes / scales / rest."""
    if done is None:
        return {}
    return {"quantization": {**done, "train": train, "storage_bytes": quant.storage_bytes(net)}}


def trained_state(net: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The trained tensors only (scales, norms, biases, head / adapters): with the base model and its
    quantization they are the whole fine-tuned model."""
    return {n: p.detach().cpu().clone() for n, p in net.named_parameters() if p.requires_grad}


def load_trained(net: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Write `trained_state` tensors into a freshly quantized (and adapted) `net`: every name must exist
    with its shape, and the integer codes are not touched."""
    params = dict(net.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise FinetuneError(f"the saved state names {len(missing)} tensor(s) this model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise FinetuneError(f"saved {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(t)
