"""The model side of a zo-finetune seed log: the recipe of the starting model, its rebuild, the save.

A log does not carry the base model: `zo-replay --base MODEL` is the same public model zo-finetune
started from (a local directory or hub name).  The log records how zo-finetune built the initial
model from it (head, label descriptions, temperature, labels, seed, dtype, trainable selection,
peft adapters), and carries the initial description head itself: that head is the encoder's pooled
embedding of the descriptions, a forward pass whose bits another CPU's BLAS need not reproduce.
The fresh head and LoRA adapters are drawn from `torch.manual_seed(seed)` on the CPU and rebuilt.
The initial weights' SHA-256 then decides: a different base model is refused before any pass.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import List, Optional, Tuple

import torch

from .format import SeedLogError, describe, kept_mode
from .replay import read_log, replay_log

RECIPE_KIND = "zo-finetune"


def recipe(*, model: Optional[str], name: str, num_labels: int, labels, dtype: str, seed: int, head: str, descriptions, temperature: float,
           partial, bitfit: bool, peft_spec) -> dict:
    """What zo-replay needs to rebuild zo-finetune's initial model from the base model."""
    return {"kind": RECIPE_KIND, "model": model, "name": name, "num_labels": int(num_labels), "labels": [str(x) for x in labels],
            "dtype": dtype, "seed": int(seed), "head": head,
            "descriptions": None if descriptions is None else list(descriptions), "temperature": float(temperature),
            "partial": partial, "bitfit": bool(bitfit), "peft": None if peft_spec is None else asdict(peft_spec)}


def named_trainable(net: torch.nn.Module, trainable) -> List[Tuple[str, torch.Tensor]]:
    names = {id(p): n for n, p in net.named_parameters()}
    return [(names[id(p)], p) for p in trainable]


def embedded_names(net: torch.nn.Module, head: str, trainable) -> List[str]:
    """The trainable tensors whose initial values the log carries: the description head's weight."""
    if head != "description":
        return []
    return [n for n, _ in named_trainable(net, trainable) if n.split(".")[-2:] == ["classifier", "weight"]]


def rebuild(base: Optional[str], r: dict, device: str = "cpu"):
    """(net, tokenizer, named trainable tensors) of the initial model the recipe describes, from the
    base model `base` (None: the --model zo-finetune was given, None there too: its default)."""
    from ..finetune.adapters import PeftSpec, apply_peft, trainable_parameters
    from ..finetune.errors import FinetuneError
    from ..finetune.model import load_model_and_tokenizer, resolve_model, select_trainable

    if r.get("kind") != RECIPE_KIND:
        raise SeedLogError(f"this log's base is {r.get('kind')!r}, not a zo-finetune model: replay it with "
                           f"zo_kernels.seedlog.replay_log on the parameters it names")
    try:
        if base is None:
            base = r.get("model")
        net, tok = load_model_and_tokenizer(resolve_model(base), int(r["num_labels"]), r["dtype"], device,
                                            int(r["seed"]), head=r["head"], descriptions=r["descriptions"],
                                            temperature=float(r["temperature"]))
        if r.get("peft"):
            net = apply_peft(net, PeftSpec(**r["peft"]))
            trainable = trainable_parameters(net)
        else:
            trainable = select_trainable(net, r.get("partial"), bool(r.get("bitfit")))
    except FinetuneError as e:
        raise SeedLogError(f"--base {base or r.get('name')}: {e}") from None
    return net, tok, named_trainable(net, trainable)


def check_out(out: str) -> None:
    """Refuse an output directory that exists and is not empty (before any work)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SeedLogError(f"--out {out} exists and is not an empty directory")


def save(net, tok, r: dict, out: str, provenance: dict) -> None:
    """Write the replayed model to `out` in the usual format, all or nothing (a temp directory renamed).

    fresh head: the transformers model's save_pretrained (config + model.safetensors); peft: the
    adapter's save_pretrained; description head: the encoder's save_pretrained plus the head in
    zo_head.safetensors and zo_head.json (temperature, labels, descriptions).  zo_replay.json
    says which log made it."""
    from safetensors.torch import save_file

    from ..finetune.heads import DescriptionClassifier

    check_out(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-zo-replay-", dir=parent)
    try:
        if isinstance(net, DescriptionClassifier):
            net.encoder.save_pretrained(tmp)
            save_file({"classifier.weight": net.classifier.weight.detach().cpu().contiguous()},
                      os.path.join(tmp, "zo_head.safetensors"))
            _json(os.path.join(tmp, "zo_head.json"), {"head": "description", "temperature": net.temperature,
                                                      "labels": r["labels"], "descriptions": r["descriptions"]})
        else:
            net.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _json(os.path.join(tmp, "zo_replay.json"), provenance)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), kept_mode())
        os.chmod(tmp, kept_mode(directory=True))
        if os.path.isdir(out):
            os.rmdir(out)           # empty (check_out): the rename needs it gone
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_description_model(out: str, device: str = "cpu"):
    """A description-head model saved by `save`, back as zo-finetune's classifier (and its tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from ..finetune.heads import DescriptionClassifier

    with open(os.path.join(out, "zo_head.json")) as f:
        head = json.load(f)
    enc = AutoModel.from_pretrained(out)
    w = load_file(os.path.join(out, "zo_head.safetensors"))["classifier.weight"]
    net = DescriptionClassifier(enc, w, head["temperature"]).to(device).eval()
    return net, AutoTokenizer.from_pretrained(out)


def _json(path: str, obj: Optional[dict]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def replay_model(base: Optional[str], log_path: str, out: str, *, threads: Optional[int] = None, device: str = "cpu",
                 backend: Optional[str] = None, progress: bool = True) -> dict:
    """zo-replay as a function (zo_kernels.seedlog.cli): returns {"sha256", "steps", "passes", "replay_s",
    ...}; SeedLogError on any refusal, with nothing written."""
    if threads is not None:
        if threads < 1:
            raise SeedLogError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SeedLogError(f"--device {device}: no CUDA GPU is available here")
    log = read_log(log_path)
    check_out(out)
    if backend is None and device == "cpu":
        backend = log.header["replay"].get("backend")
        if backend not in ("cpu", "reference"):
            backend = None
    net, tok, named = rebuild(base, log.header["base"], device)
    t0 = time.perf_counter()
    sha = replay_log(named, log, backend=backend, progress=progress)
    dt = time.perf_counter() - t0
    info = {"log": os.path.abspath(log_path), "log_sha256": log.sha256, "sha256": sha, "steps": log.header["steps"],
            "passes": len(log.records), "replay_s": dt, "backend": backend, "device": device,
            "optimizer": log.header["optimizer"], "base": log.header["base"]}
    save(net, tok, log.header["base"], out, info)
    info["summary"] = describe(log.header, log.size)
    return info
