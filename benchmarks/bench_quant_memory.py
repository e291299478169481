"""Memory of a ZO step on a quantized base (docs/quantized.md): a random-initialised model of an OPT
shape (no weights downloaded), one process per setting, run one after another (one big process at a time).

    python benchmarks/bench_quant_memory.py --model opt-1.3b --out runs/quant_memory.json
    python benchmarks/bench_quant_memory.py --model opt-tiny --settings fp32-zo,nf4-qzo   # a quick look

Settings: {fp32,nf4,int8}-inference (forward only), fp32-zo (MeZO on every weight), nf4-lora-zo (MeZO on
LoRA r=8 q_proj/v_proj adapters over NF4), nf4-qzo / int8-qzo (MeZO on the scales + norms + biases),
nf4-lora-adam (first-order Adam on the same adapters: QLoRA), fp32-adam (skipped unless --with-fp32-adam:
weights + gradients + two moments are ~16 bytes a parameter, 21 GB for OPT-1.3B).
Per setting: tensor storage (integer codes / scales / float rest), the peak RSS (VmHWM, reset after the
model is built, so building does not count) and the peak of anonymous memory during --steps steps
on one batch of --batch x --seq random tokens (causal-LM loss), and seconds per step.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

SETTINGS = ("fp32-inference", "fp32-zo", "nf4-inference", "nf4-lora-zo", "nf4-qzo", "nf4-lora-adam",
            "int8-inference", "int8-qzo")


def _child(a) -> dict:
    import torch
    from bench_step import OPT_SIZES
    from transformers import OPTConfig, OPTForCausalLM

    from zo_kernels import optim, quant
    from zo_kernels.finetune.memory import AnonSampler, _peak_rss_mb, _reset_peak
    from zo_kernels.finetune.quantize import scale_trainable
    from zo_kernels.machine import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(a.threads)
    base, _, what = a.setting.partition("-")
    with torch.device("meta"):
        net = OPTForCausalLM(OPTConfig(**OPT_SIZES[a.model], max_position_embeddings=2048, dropout=0.0,
                                       attention_dropout=0.0))
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():   # uniform, not normal: the cheapest random fill of 1.3B numbers; memory is the point
        for name, p in net.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.uniform_(-0.03, 0.03)
    net.tie_weights()
    net.eval()
    if base != "fp32":
        quant.quantize_(net, base)
    trainable = []
    if what == "qzo":
        trainable = scale_trainable(net)
    elif what.startswith("lora"):
        import peft

        net = peft.get_peft_model(net, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"]))
        trainable = [p for p in net.parameters() if p.requires_grad]
    elif what in ("zo", "adam"):
        trainable = [p for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(any(p is t for t in trainable))
    storage = quant.storage_bytes(net) if base != "fp32" else {
        "codes": 0, "scales": 0, "float": sum(p.numel() * p.element_size() for p in net.parameters())}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, OPT_SIZES[a.model]["vocab_size"], (a.batch, a.seq), generator=g)

    def loss():
        return net(input_ids=ids, labels=ids).loss

    opt = None
    if what.endswith("zo") or what == "qzo":
        opt = optim.MeZO(trainable, lr=1e-7, eps=1e-3)
    elif what.endswith("adam"):
        opt = torch.optim.Adam(trainable, lr=1e-5)
    gc.collect()
    reset = _reset_peak()
    t0 = time.perf_counter()
    with AnonSampler() as s:
        for _ in range(a.steps):
            if opt is None:
                with torch.no_grad():
                    loss()
            elif isinstance(opt, torch.optim.Adam):
                opt.zero_grad(set_to_none=True)
                loss().backward()
                opt.step()
            else:
                with torch.no_grad():
                    opt.step(loss)
    secs = (time.perf_counter() - t0) / a.steps
    return {"setting": a.setting, "model": a.model, "trainable": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in net.parameters()), "storage_bytes": storage,
            "peak_rss_mb": _peak_rss_mb(), "peak_anon_mb": s.peak_kb / 1024.0, "reset_peak": reset,
            "s_per_step": secs, "batch": [a.batch, a.seq], "threads": a.threads}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--with-fp32-adam", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file of the rows (written after each setting)")
    ap.add_argument("--setting", default=None, help=argparse.SUPPRESS)   # the child process
    a = ap.parse_args(argv)
    if a.setting:
        print(json.dumps(_child(a)), flush=True)
        return 0
    settings = [s for s in a.settings.split(",") if s] + (["fp32-adam"] if a.with_fp32_adam else [])
    rows = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    for s in settings:
        cmd = [sys.executable, os.path.abspath(__file__), "--setting", s] + [
            f"--{k}={getattr(a, k)}" for k in ("model", "batch", "seq", "steps", "threads")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"setting": s, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            from zo_kernels.finetune.files import write_json

            write_json(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
