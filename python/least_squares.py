"""Paper toy (MeZO-SVRG, Gautam et al. 2024, Fig. 1a): least squares, MeZO vs MeZO-SVRG vs FO-SGD.

    min_w  f(w) = mean_i (x_i·w − y_i)^2,   X: n×d standard normal, y = X w* + σ ε,  w0 = 0

Paper settings: d=100, n=1000, batch 32, μ=1e-3; MeZO lr 1e-3; MeZO-SVRG η1=1e-3 (full steps,
the full batch at each anchor), η2=1e-4 (minibatch steps), q=2.  FO-SGD: lr 1e-3, batch 32.
The optimum f* comes from torch.linalg.lstsq (float64).

Cost axis: a query is one forward pass of one example.  MeZO: 2·batch per step; MeZO-SVRG:
2·n on full steps, 4·batch on minibatch steps; FO-SGD: batch per step (the backward pass,
≈2 forwards of compute, is not counted).  By default MeZO and FO-SGD run until they have used
as many queries as MeZO-SVRG used in --steps steps, so both axes can be compared.

    python -m python.least_squares                 # 10k SVRG steps, 3 seeds -> runs/least_squares/
    python -m python.least_squares --steps 2000 --seeds 1 --out /tmp/ls

Writes <out>/least_squares.csv (method, seed, step, queries, loss, loss_over_opt) and
<out>/least_squares.png (loss / f* against steps and against queries).
"""
from __future__ import annotations

import os
import time
import warnings

import torch

from . import _zo_toys as toys


def make_problem(seed: int, d: int = 100, n: int = 1000, w_scale: float = 1.0, noise: float = 1.0):
    """X, y (float64), and the least-squares optimum value f*."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_star = torch.randn(d, generator=g, dtype=torch.float64) * w_scale
    y = X @ w_star + noise * torch.randn(n, generator=g, dtype=torch.float64)
    w_opt = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    f_opt = float(((X @ w_opt - y) ** 2).mean())
    return {"X": X, "y": y, "f_opt": f_opt, "seed": seed}


def run(method: str, prob: dict, steps: int, *, batch: int = 32, mu: float = 1e-3, lr_mezo: float = 1e-3,
        lr1: float = 1e-3, lr2: float = 1e-4, q: int = 2, lr_sgd: float = 1e-3, full_batch: int = 0,
        dtype=torch.float32, eval_every: int = 50, log_evals: int = 0, anchor: str = "dense", backend=None, seed: int = 0):
    """Train from w0 = 0 for `steps` steps; returns {"step", "queries", "loss"} lists (full-batch loss)."""
    X64, y64 = prob["X"], prob["y"]
    n, d = X64.shape
    X, y = X64.to(dtype), y64.to(dtype)
    w = torch.nn.Parameter(torch.zeros(d, dtype=dtype))
    gen = torch.Generator().manual_seed(1_000 + 7919 * prob["seed"] + seed)
    f = lambda idx: ((X[idx] @ w - y[idx]) ** 2).mean()
    f_all = lambda: ((X @ w - y) ** 2).mean()
    full = full_batch if 0 < full_batch < n else n
    opt = toys.make_optimizer(method, [w], mu=mu, lr_mezo=lr_mezo, lr1=lr1, lr2=lr2, q=q, lr_sgd=lr_sgd, seed=seed,
                         anchor=anchor, backend=backend)
    out = {"step": [], "queries": [], "loss": []}

    def record(step, queries):
        with torch.no_grad():
            out["step"].append(step)
            out["queries"].append(queries)
            out["loss"].append(float(((X64 @ w.detach().double() - y64) ** 2).mean()))

    toys.train(method, opt, f, n, steps, batch=batch, full=full, gen=gen, record=record, eval_every=eval_every,
          log_evals=log_evals, f_all=f_all)
    return out


def main(argv=None):
    ap = toys.common_args(__doc__.split("\n\n")[0], "least_squares", steps=10_000, seeds=3, lr_mezo=1e-3, lr1=1e-3,
                     lr2=1e-4, lr_sgd=1e-3, full_help="examples per full step (0: all n)")
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--w-scale", type=float, default=1.0, help="w* ~ N(0, w_scale^2)")
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between loss evaluations (0: auto)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*falling back.*")
    os.makedirs(args.out, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    n_full = args.full_batch if 0 < args.full_batch < args.n else args.n
    total_q = toys.svrg_queries(args.steps, args.q, n_full, args.batch)
    rows, finals = [], {m: [] for m in toys.METHODS}
    for s in range(args.seeds):
        prob = make_problem(s, args.d, args.n, args.w_scale, args.noise)
        for m in toys.METHODS:
            steps = toys.method_steps(m, args.steps, total_q, args.batch, args.equal_steps)
            every = args.eval_every or max(1, steps // 400)
            t0 = time.time()
            res = run(m, prob, steps, batch=args.batch, mu=args.mu, lr_mezo=args.lr_mezo, lr1=args.lr1,
                      lr2=args.lr2, q=args.q, lr_sgd=args.lr_sgd, full_batch=args.full_batch, dtype=dtype,
                      eval_every=every, log_evals=60, anchor=args.anchor, backend=args.backend, seed=s)
            for st, qq, loss in zip(res["step"], res["queries"], res["loss"]):
                rows.append([m, s, st, qq, loss, loss / prob["f_opt"]])
            # the loss at SVRG's step budget and at the end (equal queries)
            at_steps = [loss for st, loss in zip(res["step"], res["loss"]) if st <= args.steps][-1]
            finals[m].append((prob["f_opt"], at_steps, res["loss"][-1]))
            print(f"seed {s} {toys.LABELS[m]:10s} steps {steps:7d} queries {res['queries'][-1]:10d}  "
                  f"f/f* at {args.steps} steps {at_steps / prob['f_opt']:.4f}  at the end "
                  f"{res['loss'][-1] / prob['f_opt']:.4f}   ({time.time() - t0:.1f}s)", flush=True)
    csv_path = os.path.join(args.out, "least_squares.csv")
    toys.write_csv(csv_path, ["method", "seed", "step", "queries", "loss", "loss_over_opt"], rows)
    png = plot(rows, args, os.path.join(args.out, "least_squares.png"))
    print("\nmean f/f* over seeds (at the SVRG step budget | at equal queries):")
    for m in toys.METHODS:
        a = sum(x[1] / x[0] for x in finals[m]) / len(finals[m])
        b = sum(x[2] / x[0] for x in finals[m]) / len(finals[m])
        print(f"  {toys.LABELS[m]:10s} {a:.4f} | {b:.4f}")
    print(f"wrote {csv_path} and {png}")
    return finals


def plot(rows, args, path):
    ylabel = "full-batch loss / f*"
    return toys.plot_figure(rows, args, path, [
        toys.Panel(2, 5, ylabel, f"least squares d={args.d} n={args.n}: against steps", logy=True, optimum=True),
        toys.Panel(3, 5, ylabel, "against queries", logy=True, optimum=True),
    ], f"μ={args.mu}, batch {args.batch}", width=11)


if __name__ == "__main__":
    main()
