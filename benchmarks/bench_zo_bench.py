"""ZO-Bench-style table: every ZO-Bench method on the digits MLP at equal queries.

    python benchmarks/bench_zo_bench.py [--queries 640000] [--seeds 2] [--out DIR]

Task: sklearn's 8x8 digits (1437 train / 360 test), MLP 64-32-10 tanh, batch 32, μ = 1e-3, fp32,
the `cpu` backend.  Budget: the same number of queries for every method (one query = one forward
pass of one example; ZO steps cost queries_per_step·batch, ForwardGrad batch (its jvp is one
forward carrying tangents), FO methods batch (their backward not counted)).  Reports test accuracy
and train loss at the end, ms per step, and the optimizer's state (bytes kept between steps,
measured from opt.state; ForwardGrad's tangents are transient: its peak is the weights once more).
Learning rates are one untuned choice per method (no sweep): the table compares the methods'
mechanics at one setting, it does not rank them.  Writes CSV to --out and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
from zo_kernels import optim  # noqa: E402

MU = 1e-3
# name: (label, factory(net, seed)); one untuned learning rate each
METHODS = {
    "mezo": ("MeZO", lambda n, s: optim.MeZO(n.parameters(), lr=1e-2, eps=MU, seed=s)),
    "nspsa4": ("n-SPSA q=4", lambda n, s: optim.MeZO(n.parameters(), lr=1e-2, eps=MU, seed=s, n_directions=4)),
    "sign": ("ZO-SGD-Sign", lambda n, s: optim.ZOSGDSign(n.parameters(), lr=1e-3, eps=MU, seed=s)),
    "cons": ("ZO-SGD-Cons", lambda n, s: optim.ZOSGDCons(n.parameters(), lr=1e-2, eps=MU, seed=s)),
    "mmt-dense": ("ZO-SGD-MMT dense", lambda n, s: optim.ZOSGDMomentum(n.parameters(), lr=1e-3, eps=MU, seed=s,
                                                                       state="dense")),
    "mmt-seeded": ("ZO-SGD-MMT seeded K=32", lambda n, s: optim.ZOSGDMomentum(n.parameters(), lr=1e-3, eps=MU,
                                                                              seed=s, state="seeded", window=32)),
    "adam": ("ZO-Adam", lambda n, s: optim.ZOAdam(n.parameters(), lr=1e-3, eps=MU, seed=s)),
    "fwdgrad": ("Forward-Grad", lambda n, s: optim.ForwardGrad(n, lr=1e-2, seed=s)),
    "fo-sgd": ("FO-SGD", lambda n, s: torch.optim.SGD(n.parameters(), lr=0.1)),
    "fo-adam": ("FO-Adam", lambda n, s: torch.optim.Adam(n.parameters(), lr=1e-3)),
}


def load_data(seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:360], perm[360:]
    return X[tr], y[tr], X[te], y[te]


def run(method, data, queries, seed, batch=32):
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    opt = METHODS[method][1](net, seed)
    fo = method.startswith("fo-")
    per_step = batch * (1 if fo else getattr(opt, "queries_per_step", 2))
    gen = torch.Generator().manual_seed(10_000 + seed)
    times, used = [], 0
    while used + per_step <= queries:
        idx = torch.randint(0, len(Xtr), (batch,), generator=gen)
        t0 = time.perf_counter()
        if fo:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        else:
            opt.step(lambda: F.cross_entropy(net(Xtr[idx]), ytr[idx]))
        times.append(time.perf_counter() - t0)
        used += per_step
    with torch.no_grad():
        acc = (net(Xte).argmax(-1) == yte).float().mean().item()
        loss = F.cross_entropy(net(Xtr), ytr).item()
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    return {"method": method, "label": METHODS[method][0], "seed": seed, "queries": used, "steps": len(times),
            "test_acc": acc, "train_loss": loss, "ms_per_step": 1e3 * statistics.median(times),
            "state_x_weights": state / weights}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=640_000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_data()
    rows = [run(m, data, args.queries, s) for m in args.methods.split(",") for s in range(args.seeds)]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_zo_bench.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    base = statistics.mean(r["ms_per_step"] for r in rows if r["method"] == "mezo") if any(
        r["method"] == "mezo" for r in rows) else None
    print("| method | queries | steps | test acc | train loss | ms/step | vs MeZO | state (x weights) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        ms = statistics.mean(r["ms_per_step"] for r in rs)
        accs = ", ".join(f"{r['test_acc']:.3f}" for r in rs)
        losses = ", ".join(f"{r['train_loss']:.3f}" for r in rs)
        print(f"| {rs[0]['label']} | {rs[0]['queries']} | {rs[0]['steps']} | {accs} | {losses} | {ms:.2f} | "
              f"{ms / base:.2f} | {rs[0]['state_x_weights']:.1f} |" if base else "")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
