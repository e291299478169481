"""Peak memory per method, measured in a separate process per method.

    python -m zo_kernels.finetune.memory '<json spec>'     # prints one JSON line

A child process loads the model, builds the method's optimizer, resets the kernel's peak-RSS
counter (/proc/self/clear_refs = 5) so model loading does not count, runs a few steps on one
fixed batch, and reports:
  peak_rss_mb        VmHWM of the process during the steps (falls back to ru_maxrss, which
                     includes loading, where clear_refs is not allowed); the Python/torch
                     runtime and the weights are included, nothing subtracted
  peak_anon_mb       the peak of RssAnon (anonymous memory: weights, activations, buffers), sampled
                     every millisecond; unlike VmHWM it leaves out file-backed library pages
  cuda_peak_mb       torch.cuda.max_memory_allocated during the steps (CUDA only)
Kinds: "runtime" (the same imports, config, tokenizer and model code -- the model built on the meta
device, so no weights: the baseline to subtract), "inference" (forward
passes only on the same batch, under no_grad), and every training method.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, Optional


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Return freed heap to the OS (so the starting point is the live memory), then reset VmHWM."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class AnonSampler:
    """Peak of RssAnon (weights, activations, buffers; not the file-backed library pages, which the
    kernel may drop and re-read at will), sampled every `period` seconds from a thread."""

    def __init__(self, period: float = 0.001):
        import threading

        self.period, self.peak_kb, self._stop = period, 0, threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            v = _status_kb("RssAnon")
            if v is None:
                return
            self.peak_kb = max(self.peak_kb, v)
            time.sleep(self.period)

    def __enter__(self):
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join()
        v = _status_kb("RssAnon")
        if v is not None:
            self.peak_kb = max(self.peak_kb, v)


def _peak_rss_mb() -> float:
    hwm = _status_kb("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return hwm / 1024.0


def _child(spec: dict) -> dict:
    import torch
    import transformers  # noqa: F401  (part of the runtime every kind pays for)

    torch.set_num_threads(int(spec.get("threads", 1)))
    kind = spec["kind"]
    device = spec.get("device", "cpu")
    out = {"kind": kind}
    if kind == "runtime":
        # Everything but the weights and the work: the imports, the config, the tokenizer, and the model's
        # code (instantiated on the meta device, which allocates no storage).
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        import zo_kernels  # noqa: F401

        from .model import _quiet

        if spec.get("quantize"):     # the quantization package's import is part of its runtime
            from ..quant import available

            available(spec["quantize"])

        _quiet()
        cfg = AutoConfig.from_pretrained(spec["model"], num_labels=spec["num_labels"])
        AutoTokenizer.from_pretrained(spec["model"])
        kind_cls = AutoModel if spec.get("head", "fresh") == "description" else AutoModelForSequenceClassification
        with torch.device("meta"):
            kind_cls.from_config(cfg)
        gc.collect()
        out["reset_peak"] = _reset_peak()
        out["peak_rss_mb"] = _peak_rss_mb()
        out["peak_anon_mb"] = (_status_kb("RssAnon") or 0) / 1024.0
        return out

    from .config import TrainConfig
    from .evaluation import batch_loss
    from .model import load_model_and_tokenizer, select_trainable
    from .registry import METHODS, is_full_step

    net, _ = load_model_and_tokenizer(spec["model"], spec["num_labels"], spec.get("dtype", "float32"), device,
                                      spec.get("seed", 0), head=spec.get("head", "fresh"),
                                      descriptions=spec.get("descriptions"),
                                      temperature=spec.get("temperature", 0.05))
    from .quantize import quantize_model, scale_trainable

    quantize_model(net, spec.get("quantize"), device)
    if spec.get("train") == "scales":
        trainable = scale_trainable(net)
    elif spec.get("peft"):
        from .adapters import PeftSpec, apply_peft, trainable_parameters

        net = apply_peft(net, PeftSpec(**spec["peft"]))
        trainable = trainable_parameters(net)
    else:
        trainable = select_trainable(net, spec.get("partial"), bool(spec.get("bitfit")))
    b = torch.load(spec["batch_file"])
    batch = {k: v.to(device) for k, v in b.items()}
    n = batch["input_ids"].shape[0]
    cfg = TrainConfig(**{k: v for k, v in spec.get("cfg", {}).items() if k in TrainConfig.__dataclass_fields__})
    steps = int(spec.get("steps", 3))

    def loss_fn():
        return batch_loss(net, batch)[1]

    def full_fn():  # the large-batch closure: here two micro-batches of the same batch
        return (batch_loss(net, batch)[1] + batch_loss(net, batch)[1]) / 2

    opt = None
    zo = kind in METHODS and METHODS[kind].kind == "zo"
    if kind in METHODS:
        opt = METHODS[kind].build(net, trainable, cfg)
    elif kind != "inference":
        raise SystemExit(f"unknown kind {kind!r}")
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out["reset_peak"] = _reset_peak()
    t0 = time.perf_counter()
    sampler = AnonSampler()
    sampler.__enter__()
    for _ in range(steps):
        if kind == "inference":
            with torch.no_grad():
                loss_fn()
        elif zo and hasattr(opt, "is_full_step"):
            with torch.no_grad():
                opt.step(loss_fn, full_closure=full_fn if is_full_step(opt) else None)
        elif zo:
            with torch.no_grad():
                opt.step(loss_fn)
        else:
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
    sampler.__exit__(None, None, None)
    out["peak_anon_mb"] = sampler.peak_kb / 1024.0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["steps"] = steps
    out["batch"] = [int(n), int(batch["input_ids"].shape[1])]
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def measure(kind: str, spec: dict, timeout: float = 600) -> Dict:
    """Run one measuring child process; returns its JSON (or {"error": ...})."""
    spec = dict(spec, kind=kind)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TQDM_DISABLE"] = "1"
    cmd = [sys.executable, "-m", "zo_kernels.finetune.memory", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"kind": kind, "error": f"exit {p.returncode}: {err}"}


def measure_all(kinds, spec: dict, workers: int = 1) -> Dict[str, dict]:
    """Measure every kind, `workers` processes at a time (peak RSS is per process, so running them side
    by side on a CPU does not change it; each then gets threads // workers torch threads)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(workers, len(kinds)))
    spec = dict(spec, threads=max(1, int(spec.get("threads", 1)) // workers))

    def one(kind):
        t0 = time.perf_counter()
        r = measure(kind, spec)
        r["measure_s"] = time.perf_counter() - t0
        r["threads"] = spec["threads"]
        return kind, r

    with ThreadPoolExecutor(workers) as ex:
        results = dict(ex.map(one, kinds))
    return summarize({k: results[k] for k in kinds})


def summarize(results: Dict[str, dict]) -> Dict[str, dict]:
    """Add multiples of inference memory: absolute, and with the runtime baseline subtracted."""
    inf = results.get("inference", {})
    base = results.get("runtime", {}).get("peak_rss_mb")
    for kind, r in results.items():
        if "peak_rss_mb" not in r:
            continue
        if inf.get("peak_rss_mb"):
            r["x_inference"] = r["peak_rss_mb"] / inf["peak_rss_mb"]
        if base is not None and kind != "runtime":
            r["above_runtime_mb"] = r["peak_rss_mb"] - base
            if inf.get("peak_rss_mb") and inf["peak_rss_mb"] > base:
                r["x_inference_above_runtime"] = (r["peak_rss_mb"] - base) / (inf["peak_rss_mb"] - base)
        if r.get("peak_anon_mb") and inf.get("peak_anon_mb"):
            r["anon_x_inference"] = r["peak_anon_mb"] / inf["peak_anon_mb"]
            b = results.get("runtime", {}).get("peak_anon_mb")
            if b is not None and kind != "runtime" and inf["peak_anon_mb"] > b:
                r["anon_x_inference_above_runtime"] = (r["peak_anon_mb"] - b) / (inf["peak_anon_mb"] - b)
        if "cuda_peak_mb" in r and inf.get("cuda_peak_mb"):
            r["cuda_x_inference"] = r["cuda_peak_mb"] / inf["cuda_peak_mb"]
    return results


if __name__ == "__main__":
    res = _child(json.loads(sys.argv[1]))
    print(json.dumps(res), flush=True)
