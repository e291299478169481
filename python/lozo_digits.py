"""LOZO and LOZO-M against MeZO and MeZO-SVRG at equal queries: the MLP on sklearn's digits.

The same problem as mlp_digits.py (64 → hidden (tanh) → 10, cross-entropy, batch 32, seeded 80/20
split): its two weight matrices get LOZO's low-rank U Vᵀ perturbations, its biases ordinary z.
Every method gets the same query budget (one query: a forward pass of one example; MeZO, LOZO and
LOZO-M 2·batch per step; MeZO-SVRG 2·N on full steps and 4·batch otherwise).

    python -m python.lozo_digits --out runs/lozo_digits                 # the comparison
    python -m python.lozo_digits --tune --out runs/lozo_tune            # LOZO / LOZO-M lr, rank, ν sweep

Writes <out>/lozo_digits.csv (method, seed, step, queries, train_loss, test_acc) and a plot.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

from zo_kernels.optim import LOZO, LOZOM

from ._zo_toys import figure, make_optimizer, save_figure, train, write_csv
from .mlp_digits import load_data, make_mlp

LABELS = {"lozo": "LOZO", "lozo-m": "LOZO-M", "mezo": "MeZO", "mezo-svrg": "MeZO-SVRG"}
COLORS = {"lozo": "tab:green", "lozo-m": "tab:olive", "mezo": "tab:blue", "mezo-svrg": "tab:red"}


def run(method, data, budget, *, seed, args, lr=None, rank=None, nu=None):
    net = make_mlp(seed, args.hidden)
    Xtr, ytr, Xte, yte = data["Xtr"], data["ytr"], data["Xte"], data["yte"]
    n = len(Xtr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    rank, nu = rank or args.rank, nu or args.nu
    if method == "lozo":
        opt = LOZO(net.parameters(), lr=lr or args.lr_lozo, eps=args.mu, rank=rank, nu=nu, seed=seed)
    elif method == "lozo-m":
        opt = LOZOM(net.parameters(), lr=lr or args.lr_lozom, eps=args.mu, rank=rank, nu=nu, beta=args.beta, seed=seed)
    else:
        opt = make_optimizer(method, net.parameters(), mu=args.mu, lr_mezo=args.lr_mezo, lr1=args.lr1, lr2=args.lr2,
                             q=args.q, lr_sgd=0.0, seed=seed, anchor="dense", backend=None)
    if method == "mezo-svrg":
        per_cycle = 2 * n + 4 * args.batch * (args.q - 1)     # queries of q steps: one full, q − 1 minibatch
        steps = args.q * budget // per_cycle
    else:
        steps = budget // (2 * args.batch)
    f = lambda idx: F.cross_entropy(net(Xtr[idx]), ytr[idx])  # noqa: E731
    out = []

    def record(step, queries):
        with torch.no_grad():
            out.append((step, queries, float(F.cross_entropy(net(Xtr), ytr)),
                        float((net(Xte).argmax(1) == yte).float().mean())))

    train("mezo" if method.startswith("lozo") else method, opt, f, n, steps, batch=args.batch, full=n, gen=gen,
          record=record, eval_every=max(1, steps // 100), log_evals=0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mu", type=float, default=1e-3)
    ap.add_argument("--lr-mezo", type=float, default=1e-2)
    ap.add_argument("--lr1", type=float, default=3e-2)
    ap.add_argument("--lr2", type=float, default=1e-2)
    ap.add_argument("--q", type=int, default=2)
    ap.add_argument("--lr-lozo", type=float, default=3e-3)
    ap.add_argument("--lr-lozom", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--nu", type=int, default=50)
    ap.add_argument("--beta", type=float, default=0.9)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--out", default=os.path.join("runs", "lozo_digits"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*falling back.*")
    os.makedirs(args.out, exist_ok=True)
    data = load_data(0)
    if args.tune:
        grid = [("lozo", lr, 2, 50) for lr in (3e-3, 1e-2, 3e-2)] + [("lozo", 1e-2, 4, 50), ("lozo", 1e-2, 2, 10)]
        grid += [("lozo-m", lr, 2, 50) for lr in (3e-3, 1e-2, 3e-2)]
        for method, lr, rank, nu in grid:
            t0 = time.time()
            res = run(method, data, args.queries, seed=0, args=args, lr=lr, rank=rank, nu=nu)
            print(f"{method:7s} lr {lr:g} rank {rank} nu {nu:3d}: loss {res[-1][2]:.4f} acc {res[-1][3]:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        return None
    rows = []
    for s in range(args.seeds):
        for m in ("mezo", "mezo-svrg", "lozo", "lozo-m"):
            t0 = time.time()
            res = run(m, data, args.queries, seed=s, args=args)
            rows += [[m, s, *r] for r in res]
            print(f"seed {s} {LABELS[m]:10s} steps {res[-1][0]:6d} queries {res[-1][1]:8d}: "
                  f"train loss {res[-1][2]:.4f}, test acc {res[-1][3]:.3f}  ({time.time() - t0:.0f}s)", flush=True)
    path = os.path.join(args.out, "lozo_digits.csv")
    write_csv(path, ["method", "seed", "step", "queries", "train_loss", "test_acc"], rows)
    print(f"wrote {path} and {plot(rows, args, os.path.join(args.out, 'lozo_digits.png'))}")
    return rows


def plot(rows, args, path):
    fig, axes = figure(2, 10, 3.8)
    for ax, col, ylabel in ((axes[0], 4, "full training loss"), (axes[1], 5, "test accuracy")):
        for m in LABELS:
            for i, s in enumerate(sorted({r[1] for r in rows if r[0] == m})):
                pts = [r for r in rows if r[0] == m and r[1] == s]
                ax.plot([p[3] for p in pts], [p[col] for p in pts], color=COLORS[m], lw=1.2, alpha=0.8,
                        label=LABELS[m] if i == 0 else None)
        ax.set(xlabel="queries (forward passes of one example)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    return save_figure(fig, path, f"MLP on digits at equal queries: μ={args.mu}, batch {args.batch}; MeZO lr {args.lr_mezo}; "
                       f"MeZO-SVRG η1={args.lr1} η2={args.lr2} q={args.q}; LOZO lr {args.lr_lozo}, LOZO-M lr "
                       f"{args.lr_lozom} β={args.beta}; rank {args.rank}, ν={args.nu}; {args.seeds} seeds", fontsize=8)


if __name__ == "__main__":
    main()
