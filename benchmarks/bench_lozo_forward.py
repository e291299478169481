"""Does applying LOZO's perturbation inside the forward pay?  (issue 15, item 6)

For nn.Linear, (W + μ U Vᵀ) x = W x + μ U (Vᵀ x): the perturbation can be applied inside the forward
without writing W, and l+ and l− can share one forward of the doubled batch.  One LOZO step of a
stack of L Linear(d, d) layers (tanh between, mean-square loss), timed two ways in one process:

  passes     the fused way: lowrank_noise_axpy_ +μ, forward, −2μ, forward, restore + update
             (3 passes over W, 2 forwards of the batch)
  in_forward U and V materialised per layer ((m + n)·r numbers, noise_ on streams 3 / 4); one forward
             of [x; x] with y = xWᵀ ± μ (x V) Uᵀ per half; then one update pass (1 pass over W,
             1 forward of 2·batch)

Both compute the same l+ and l− (to fp32 round-off) and the same update.  Prints ms per step and the
ratio; writes CSV + PNG to --out.

    python benchmarks/bench_lozo_forward.py [--dims 256,1024] [--batches 16,64] [--rank 2]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_utils import pyplot, save_figure, write_csv  # noqa: E402

import zo_kernels  # noqa: E402
from zo_kernels.noise import step_key  # noqa: E402


def make(dim, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(dim, dim, generator=g) / dim ** 0.5) for _ in range(layers)]


def forward(ws, x):
    for w in ws[:-1]:
        x = torch.tanh(x @ w.T)
    return x @ ws[-1].T


def step_passes(ws, x, y, ku, kv, r, mu, lr):
    zo_kernels.lowrank_noise_axpy_(ws, [ku], kv, [mu], rank=r)
    lp = ((forward(ws, x) - y) ** 2).mean().item()
    zo_kernels.lowrank_noise_axpy_(ws, [ku], kv, [-2 * mu], rank=r)
    lm = ((forward(ws, x) - y) ** 2).mean().item()
    c = (lp - lm) / (2 * mu)
    zo_kernels.lowrank_noise_axpy_(ws, [ku], kv, [mu - lr * c], rank=r)
    return lp, lm


def step_in_forward(ws, x, y, ku, kv, r, mu, lr):
    b = x.shape[0]
    sign = torch.cat([torch.full((b, 1), mu), torch.full((b, 1), -mu)])
    h = torch.cat([x, x])
    for i, w in enumerate(ws):
        m, n = w.shape
        u = zo_kernels.noise_(torch.empty(m * r), ku, i, stream=3).view(m, r)
        v = zo_kernels.noise_(torch.empty(n * r), kv, i, stream=4).view(n, r)
        h = h @ w.T + sign * ((h @ v) @ u.T)
        if i < len(ws) - 1:
            h = torch.tanh(h)
    lp = ((h[:b] - y) ** 2).mean().item()
    lm = ((h[b:] - y) ** 2).mean().item()
    c = (lp - lm) / (2 * mu)
    zo_kernels.lowrank_noise_axpy_(ws, [ku], kv, [-lr * c], rank=r)
    return lp, lm


def timed(fn, reps):
    fn(0)
    times = []
    for t in range(1, reps + 1):
        t0 = time.perf_counter()
        fn(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="256,1024")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for d in [int(s) for s in args.dims.split(",")]:
        for b in [int(s) for s in args.batches.split(",")]:
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
            ws_a, ws_b = make(d, args.layers), make(d, args.layers)
            # the two ways agree (same losses to round-off, same weights after a step)
            la = step_passes(ws_a, x, y, step_key(0, 0), step_key(0, 0), args.rank, 1e-3, 1e-3)
            lb = step_in_forward(ws_b, x, y, step_key(0, 0), step_key(0, 0), args.rank, 1e-3, 1e-3)
            agree = max(abs(p - q) for p, q in zip(la, lb)) / max(abs(la[0]), 1e-12)
            res = {}
            for name, fn in (("passes", step_passes), ("in_forward", step_in_forward)):
                ws = make(d, args.layers)
                res[name] = timed(lambda t: fn(ws, x, y, step_key(0, t), step_key(0, 0), args.rank, 1e-3, 1e-3),
                                  args.reps)
            for name, sec in res.items():
                rows.append(dict(dim=d, batch=b, layers=args.layers, rank=args.rank, threads=args.threads,
                                 method=name, ms_per_step=sec * 1e3, speedup_vs_passes=res["passes"] / sec,
                                 loss_rel_diff=agree))
            print(f"d={d:5d} batch={b:4d}: passes {res['passes'] * 1e3:8.2f} ms  in_forward "
                  f"{res['in_forward'] * 1e3:8.2f} ms  ratio {res['passes'] / res['in_forward']:.2f}x  "
                  f"(losses agree to {agree:.1e})", flush=True)
    out = pathlib.Path(args.out)
    write_csv(rows, out / "bench_lozo_forward.csv")
    plt = pyplot()
    if plt is None:
        return rows
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    labels = [f"d={r['dim']}\nB={r['batch']}" for r in rows if r["method"] == "passes"]
    for k, name in enumerate(("passes", "in_forward")):
        vals = [r["ms_per_step"] for r in rows if r["method"] == name]
        ax.bar([i + 0.4 * k for i in range(len(vals))], vals, width=0.4, label=name)
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels)
    ax.set(ylabel="ms per LOZO step", yscale="log", title=f"{args.layers} Linear layers, rank {args.rank}")
    ax.legend()
    save_figure(plt, fig, out / "bench_lozo_forward.csv", out / "bench_lozo_forward.png")
    return rows


if __name__ == "__main__":
    main()
