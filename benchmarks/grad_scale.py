"""The gradient scale behind zo-finetune's default ZO-SGD-Sign and ZO-Adam learning rates.

    python benchmarks/grad_scale.py [--batches 8] [--seed 0]

At zo-finetune's default start (all-MiniLM-L6-v2, description head, Rotten Tomatoes, batch 16, max
64 tokens, full fine-tuning), over the first `--batches` training batches of the seed's data order:
the minibatch gradient norm |∇f_B| (one backward each) and MeZO's coefficient c = (f(θ+μz) −
f(θ−μz))/2μ along one seeded z (μ = 1e-3).  E[c²] = |∇f_B|² for Gaussian z, so both rms values
estimate the same scale; methods.GRAD_SCALE is it, rounded (docs/zo_bench.md).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from zo_kernels import noise_axpy_  # noqa: E402
from zo_kernels.finetune.cli import build_parser  # noqa: E402
from zo_kernels.finetune.config import TrainConfig  # noqa: E402
from zo_kernels.finetune.data import load_text_classification  # noqa: E402
from zo_kernels.finetune.evaluation import batch_loss  # noqa: E402
from zo_kernels.finetune.heads import default_descriptions  # noqa: E402
from zo_kernels.finetune.model import Encoded, load_model_and_tokenizer, resolve_model, select_trainable  # noqa: E402
from zo_kernels.finetune.training import Sampler  # noqa: E402
from zo_kernels.noise import step_key  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = build_parser().parse_args([])         # zo-finetune's defaults: split sizes, max length, batch
    cfg = TrainConfig(seed=args.seed, batch_size=d.batch_size, eps=d.eps)
    data = load_text_classification(None, n_train=d.n_train, n_val=d.n_val, n_test=d.n_test, seed=args.seed)
    net, tok = load_model_and_tokenizer(resolve_model(None), data.num_labels, head="description",
                                        descriptions=default_descriptions(data.label_names), seed=args.seed)
    params = select_trainable(net, None)
    enc = Encoded(tok, data.train.texts, data.train.labels, d.max_length, "cpu")
    sampler = Sampler(len(enc), cfg.batch_size, args.seed)
    mu, g2, c2 = cfg.eps, [], []
    for i in range(args.batches):
        b = enc.batch(sampler.next())
        net.zero_grad(set_to_none=True)
        batch_loss(net, b)[1].backward()
        g2.append(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
        with torch.no_grad():
            k = step_key(args.seed, i)
            noise_axpy_(params, k, mu)
            lp = float(batch_loss(net, b)[1])
            noise_axpy_(params, k, -2 * mu)
            lm = float(batch_loss(net, b)[1])
            noise_axpy_(params, k, mu)
        c2.append(((lp - lm) / (2 * mu)) ** 2)
        print(f"batch {i}: |grad f_B| {math.sqrt(g2[-1]):.3f}   |c| {math.sqrt(c2[-1]):.3f}", flush=True)
    n = len(g2)
    print(f"rms |grad f_B| = {math.sqrt(sum(g2) / n):.3f}, rms c = {math.sqrt(sum(c2) / n):.3f} over {n} batches "
          f"of {cfg.batch_size}; {sum(p.numel() for p in params):,} trainable weights")


if __name__ == "__main__":
    main()
