"""Paper-style toy: a 2-layer MLP on sklearn's digits, MeZO vs MeZO-SVRG vs FO-SGD.

1797 8×8 digits (ships with scikit-learn), pixels / 16, a seeded 80/20 train/test split;
MLP 64 → hidden (tanh) → 10, cross-entropy, batch 32.  MeZO-SVRG takes a full step on the
whole training set (or --full-batch examples, the paper's Remark 3.3) every q steps.

Queries: one forward pass of one example.  MeZO 2·batch per step, MeZO-SVRG 2·N_full on full
steps and 4·batch otherwise, FO-SGD batch per step (backward not counted).  By default MeZO
and FO-SGD run as many queries as MeZO-SVRG uses in --steps steps.

    python -m python.mlp_digits --out runs/mlp_digits

Writes <out>/mlp_digits.csv (method, seed, step, queries, train_loss, test_acc) and
<out>/mlp_digits.png (training loss against steps and against queries; test accuracy).
"""
from __future__ import annotations

import os
import time
import warnings

import torch
import torch.nn.functional as F

from . import _zo_toys as toys


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
    opt = toys.make_optimizer(method, net.parameters(), mu=mu, lr_mezo=lr_mezo, lr1=lr1, lr2=lr2, q=q, lr_sgd=lr_sgd,
                         seed=seed, anchor=anchor, backend=backend)
    f = lambda idx: F.cross_entropy(net(Xtr[idx]), ytr[idx])
    out = {"step": [], "queries": [], "train_loss": [], "test_acc": []}

    def record(step, queries):
        with torch.no_grad():
            out["step"].append(step)
            out["queries"].append(queries)
            out["train_loss"].append(float(F.cross_entropy(net(Xtr), ytr)))
            out["test_acc"].append(float((net(Xte).argmax(1) == yte).float().mean()))

    toys.train(method, opt, f, n, steps, batch=batch, full=full, gen=gen, record=record, eval_every=eval_every,
          log_evals=log_evals)
    return out


def main(argv=None):
    ap = toys.common_args(__doc__.split("\n\n")[0], "mlp_digits", steps=4000, seeds=2, lr_mezo=1e-2, lr1=3e-2,
                     lr2=1e-2, lr_sgd=0.1, full_help="examples per full step (0: the toys.train set)")
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*falling back.*")
    os.makedirs(args.out, exist_ok=True)
    data = load_data(0)
    n = len(data["Xtr"])
    n_full = args.full_batch if 0 < args.full_batch < n else n
    total_q = toys.svrg_queries(args.steps, args.q, n_full, args.batch)
    rows = []
    for s in range(args.seeds):
        for m in toys.METHODS:
            steps = toys.method_steps(m, args.steps, total_q, args.batch, args.equal_steps)
            t0 = time.time()
            res = run(m, data, steps, seed=s, hidden=args.hidden, batch=args.batch, mu=args.mu,
                      lr_mezo=args.lr_mezo, lr1=args.lr1, lr2=args.lr2, q=args.q, lr_sgd=args.lr_sgd,
                      full_batch=args.full_batch, eval_every=max(1, steps // 200), log_evals=40, anchor=args.anchor,
                      backend=args.backend)
            for st, qq, loss, acc in zip(res["step"], res["queries"], res["train_loss"], res["test_acc"]):
                rows.append([m, s, st, qq, loss, acc])
            at = [i for i, st in enumerate(res["step"]) if st <= args.steps][-1]
            print(f"seed {s} {toys.LABELS[m]:10s} steps {steps:7d} queries {res['queries'][-1]:9d}  "
                  f"at {args.steps} steps: loss {res['train_loss'][at]:.4f} acc {res['test_acc'][at]:.3f}  "
                  f"end: loss {res['train_loss'][-1]:.4f} acc {res['test_acc'][-1]:.3f}  ({time.time() - t0:.1f}s)",
                  flush=True)
    csv_path = os.path.join(args.out, "mlp_digits.csv")
    toys.write_csv(csv_path, ["method", "seed", "step", "queries", "train_loss", "test_acc"], rows)
    png = plot(rows, args, os.path.join(args.out, "mlp_digits.png"))
    print(f"wrote {csv_path} and {png}")
    return rows


def plot(rows, args, path):
    return toys.plot_figure(rows, args, path, [
        toys.Panel(2, 4, "full training loss", "MLP on digits: against steps", logy=True),
        toys.Panel(3, 4, "full training loss", "against queries", logy=True),
        toys.Panel(3, 5, "test accuracy", "test accuracy against queries"),
    ], f"μ={args.mu}, batch {args.batch}, hidden {args.hidden}", width=15)


if __name__ == "__main__":
    main()
