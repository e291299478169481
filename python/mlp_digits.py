"""Paper-style toy: a 2-layer MLP on sklearn's digits, MeZO vs MeZO-SVRG vs FO-SGD.

1797 8×8 digits (ships with scikit-learn), pixels / 16, a seeded 80/20 train/test split;
MLP 64 → hidden (tanh) → 10, cross-entropy, batch 32.  MeZO-SVRG takes a full step on the
whole training set (or --full-batch examples, the paper's Remark 3.3) every q steps.

Queries: one forward pass of one example.  MeZO 2·batch per step, MeZO-SVRG 2·N_full on full
steps and 4·batch otherwise, FO-SGD batch per step (backward not counted).  By default MeZO
and FO-SGD run as many queries as MeZO-SVRG uses in --steps steps.

    python python/mlp_digits.py --out runs/mlp_digits

Writes <out>/mlp_digits.csv (method, seed, step, queries, train_loss, test_acc) and
<out>/mlp_digits.png (training loss against steps and against queries; test accuracy).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zo_kernels.optim import MeZO, MeZOSVRG  # noqa: E402

METHODS = ("mezo-svrg", "mezo", "fo-sgd")
LABELS = {"mezo-svrg": "MeZO-SVRG", "mezo": "MeZO", "fo-sgd": "FO-SGD"}


def load_data(seed: int = 0, test_frac: float = 0.2):
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_frac * len(X)))
    te, tr = perm[:n_test], perm[n_test:]
    return {"Xtr": X[tr], "ytr": y[tr], "Xte": X[te], "yte": y[te]}


def make_mlp(seed: int, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))


def run(method: str, data: dict, steps: int, *, seed: int = 0, hidden: int = 32, batch: int = 32,
        mu: float = 1e-3, lr_mezo: float = 1e-2, lr1: float = 3e-2, lr2: float = 1e-2, q: int = 2,
        lr_sgd: float = 0.1, full_batch: int = 0, eval_every: int = 50, log_evals: int = 0, anchor: str = "dense", backend=None):
    net = make_mlp(seed, hidden)
    Xtr, ytr, Xte, yte = data["Xtr"], data["ytr"], data["Xte"], data["yte"]
    n = len(Xtr)
    full = full_batch if 0 < full_batch < n else n
    gen = torch.Generator().manual_seed(10_000 + seed)
    if method == "mezo":
        opt = MeZO(net.parameters(), lr=lr_mezo, eps=mu, seed=seed, backend=backend)
    elif method == "mezo-svrg":
        opt = MeZOSVRG(net.parameters(), lr=lr2, lr_full=lr1, eps=mu, q=q, seed=seed, anchor=anchor,
                       backend=backend)
    elif method == "fo-sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr_sgd)
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    f = lambda idx: F.cross_entropy(net(Xtr[idx]), ytr[idx])
    out = {"step": [], "queries": [], "train_loss": [], "test_acc": []}
    queries = 0

    def record(step):
        with torch.no_grad():
            out["step"].append(step)
            out["queries"].append(queries)
            out["train_loss"].append(float(F.cross_entropy(net(Xtr), ytr)))
            out["test_acc"].append(float((net(Xte).argmax(1) == yte).float().mean()))

    # log_evals extra evaluation points spaced geometrically, so the start shows on log axes
    extra = {int(round(steps ** (i / log_evals))) for i in range(1, log_evals + 1)} if log_evals else set()
    record(0)
    for t in range(1, steps + 1):
        idx = torch.randint(0, n, (batch,), generator=gen)
        if method == "fo-sgd":
            opt.zero_grad(set_to_none=True)
            f(idx).backward()
            opt.step()
            queries += batch
        elif method == "mezo":
            opt.step(lambda: f(idx))
            queries += 2 * batch
        elif opt.is_full_step:
            fidx = torch.arange(n) if full == n else torch.randperm(n, generator=gen)[:full]
            opt.step(None, full_closure=lambda: f(fidx))
            queries += 2 * full
        else:
            opt.step(lambda: f(idx))
            queries += 4 * batch
        if t % eval_every == 0 or t == steps or t in extra:
            record(t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000, help="MeZO-SVRG steps")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mu", type=float, default=1e-3)
    ap.add_argument("--lr-mezo", type=float, default=1e-2)
    ap.add_argument("--lr1", type=float, default=3e-2, help="MeZO-SVRG η1 (full steps)")
    ap.add_argument("--lr2", type=float, default=1e-2, help="MeZO-SVRG η2 (minibatch steps)")
    ap.add_argument("--q", type=int, default=2)
    ap.add_argument("--lr-sgd", type=float, default=0.1)
    ap.add_argument("--full-batch", type=int, default=0, help="examples per full step (0: the train set)")
    ap.add_argument("--anchor", choices=("dense", "replay"), default="dense")
    ap.add_argument("--equal-steps", action="store_true",
                    help="run every method for --steps steps (default: MeZO / FO-SGD match SVRG's queries)")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--out", default=os.path.join("runs", "mlp_digits"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*falling back.*")
    os.makedirs(args.out, exist_ok=True)
    data = load_data(0)
    n = len(data["Xtr"])
    n_full = args.full_batch if 0 < args.full_batch < n else n
    n_fullsteps = (args.steps + args.q - 1) // args.q
    total_q = n_fullsteps * 2 * n_full + (args.steps - n_fullsteps) * 4 * args.batch
    rows = []
    for s in range(args.seeds):
        for m in METHODS:
            if m == "mezo-svrg" or args.equal_steps:
                steps = args.steps
            else:
                steps = total_q // (2 * args.batch if m == "mezo" else args.batch)
            t0 = time.time()
            res = run(m, data, steps, seed=s, hidden=args.hidden, batch=args.batch, mu=args.mu,
                      lr_mezo=args.lr_mezo, lr1=args.lr1, lr2=args.lr2, q=args.q, lr_sgd=args.lr_sgd,
                      full_batch=args.full_batch, eval_every=max(1, steps // 200), log_evals=40, anchor=args.anchor,
                      backend=args.backend)
            for st, qq, l, a in zip(res["step"], res["queries"], res["train_loss"], res["test_acc"]):
                rows.append([m, s, st, qq, l, a])
            at = [i for i, st in enumerate(res["step"]) if st <= args.steps][-1]
            print(f"seed {s} {LABELS[m]:10s} steps {steps:7d} queries {res['queries'][-1]:9d}  "
                  f"at {args.steps} steps: loss {res['train_loss'][at]:.4f} acc {res['test_acc'][at]:.3f}  "
                  f"end: loss {res['train_loss'][-1]:.4f} acc {res['test_acc'][-1]:.3f}  ({time.time() - t0:.1f}s)",
                  flush=True)
    csv_path = os.path.join(args.out, "mlp_digits.csv")
    with open(csv_path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["method", "seed", "step", "queries", "train_loss", "test_acc"])
        wr.writerows(rows)
    png = plot(rows, args, os.path.join(args.out, "mlp_digits.png"))
    print(f"wrote {csv_path} and {png}")
    return rows


def plot(rows, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mezo-svrg": "tab:red", "mezo": "tab:blue", "fo-sgd": "tab:gray"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = ((axes[0], 2, 4, "steps", "full training loss"),
              (axes[1], 3, 4, "queries (forward passes of one example)", "full training loss"),
              (axes[2], 3, 5, "queries (forward passes of one example)", "test accuracy"))
    for ax, xkey, ykey, xlabel, ylabel in panels:
        for m in METHODS:
            seeds = sorted({r[1] for r in rows if r[0] == m})
            for i, s in enumerate(seeds):
                pts = [r for r in rows if r[0] == m and r[1] == s and
                       (r[3] > 0 if xkey == 3 else r[2] <= args.steps)]
                ax.plot([p[xkey] for p in pts], [p[ykey] for p in pts], color=colors[m], alpha=0.8,
                        lw=1.2, label=LABELS[m] if i == 0 else None)
        ax.set_xscale("log" if xkey == 3 else "linear")
        if ykey == 4:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("MLP on digits: against steps")
    axes[1].set_title("against queries")
    axes[2].set_title("test accuracy against queries")
    axes[0].legend()
    fig.suptitle(f"μ={args.mu}, batch {args.batch}, hidden {args.hidden}; MeZO lr {args.lr_mezo}; MeZO-SVRG "
                 f"η1={args.lr1} η2={args.lr2} q={args.q}; FO-SGD lr {args.lr_sgd}; {args.seeds} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
