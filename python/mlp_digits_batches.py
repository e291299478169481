"""MeZO-SVRG's small-batch claim on the paper's kind of model (issue 25, item 2): a two-layer MLP on digits.

Gautam et al. (ICML 2024, Appendix E.4) report that MeZO-SVRG stays stable at small batches where MeZO
diverges.  Here: the MLP of mlp_digits.py (64 -> 32 tanh -> 10) on sklearn's digits, its 80/20 split with a
fifth of the training part held out for validation (1,150 train / 288 validation / 359 test).

1. Tuning at batch 64 (the paper's LM batch), seed 0, by final validation accuracy: MeZO lr over
   --mezo-grid, MeZO-SVRG (eta1, eta2) = k x (3e-2, 1e-2) over --svrg-grid (q = 2, full steps on the whole
   training part).  Budget: --steps MeZO-SVRG steps at batch 64, and MeZO as many queries.
2. Batch rows: both methods at their chosen rates at every --batches value, --seeds seeds, the same query
   budget: final training loss (whole training part), test accuracy, and whether the loss diverged (a
   non-finite loss, which the optimizer refuses, or a final loss above the start's).

    python -m python.mlp_digits_batches --out runs/mlp_digits_batches

Writes <out>/mlp_digits_batches.json (tuning, rows), .csv (one row per run) and .png (final train loss and
test accuracy against the batch size); --into RANKING_JSON also puts the rows under batch_sizes.mlp_digits
(with --from-json JSON: an earlier run's result, nothing run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings

import torch

from zo_kernels.finetune import files
from zo_kernels.finetune.errors import FinetuneError
from zo_kernels.finetune.ranking.choice import rank_key
from zo_kernels.finetune.ranking.collect import put_reserved, read
from zo_kernels.optim import NonFiniteLossError

from . import _zo_toys as toys
from .mlp_digits import load_data
from .mlp_digits import run as run_mlp

SVRG_BASE = (3e-2, 1e-2)        # (eta1, eta2) of mlp_digits.py, the grid's factor 1


def split(data: dict, val_frac: float = 0.2) -> dict:
    """The training part split again: its last `val_frac` is the validation set (the test set is untouched)."""
    n_val = int(round(val_frac * len(data["Xtr"])))
    return {"Xtr": data["Xtr"][:-n_val], "ytr": data["ytr"][:-n_val], "Xva": data["Xtr"][-n_val:],
            "yva": data["ytr"][-n_val:], "Xte": data["Xte"], "yte": data["yte"]}


def one(method: str, data: dict, *, rate, batch: int, seed: int, queries: int, steps: int, on: str) -> dict:
    """One run, evaluated on `on` ("val" or "test"): final train loss, accuracy, diverged, steps."""
    d = {"Xtr": data["Xtr"], "ytr": data["ytr"], "Xte": data["X" + on[:2]], "yte": data["y" + on[:2]]}
    kw = dict(lr_mezo=rate) if method == "mezo" else dict(lr1=rate[0], lr2=rate[1], q=2)
    n_steps = steps if method == "mezo-svrg" else queries // (2 * batch)
    t0 = time.perf_counter()
    try:
        res = run_mlp(method, d, n_steps, seed=seed, batch=batch, eval_every=max(1, n_steps // 20), **kw)
        loss, acc, start = res["train_loss"][-1], res["test_acc"][-1], res["train_loss"][0]
        diverged = not math.isfinite(loss) or loss > start
        used = res["queries"][-1]
    except NonFiniteLossError:
        loss, acc, diverged, used = float("nan"), float("nan"), True, None
    return {"method": method, "batch": batch, "seed": seed, "rate": rate, "steps": n_steps, "queries": used,
            "train_loss": loss, "acc": acc, "on": on, "diverged": diverged, "seconds": time.perf_counter() - t0}


def svrg_steps_for(queries: int, batch: int, n: int, q: int = 2) -> int:
    """The most MeZO-SVRG steps at `batch` that fit `queries` (full steps on all n examples)."""
    s = 1
    while toys.svrg_queries(s + 1, q, n, batch) <= queries:
        s += 1
    return s


def _best(rows):
    """The ranking's rule (validation accuracy, then train loss, then the lower rate; diverged runs last)."""
    return min(rows, key=lambda r: rank_key(r["acc"], r["train_loss"], r["diverged"],
                                            r["rate"] if isinstance(r["rate"], float) else r["rate"][1]))


def study(args) -> dict:
    data = split(load_data(0))
    n = len(data["Xtr"])
    queries = toys.svrg_queries(args.steps, 2, n, 64)
    tuning = {"mezo": [one("mezo", data, rate=r, batch=64, seed=0, queries=queries, steps=0, on="val")
                       for r in args.mezo_grid],
              "mezo-svrg": [one("mezo-svrg", data, rate=[k * SVRG_BASE[0], k * SVRG_BASE[1]], batch=64, seed=0,
                                queries=queries, steps=args.steps, on="val") for k in args.svrg_grid]}
    chosen = {m: _best(rows)["rate"] for m, rows in tuning.items()}
    runs = []
    for b in args.batches:
        for m in ("mezo", "mezo-svrg"):
            steps = svrg_steps_for(queries, b, n) if m == "mezo-svrg" else 0
            for s in range(args.seeds):
                runs.append(one(m, data, rate=chosen[m], batch=b, seed=s, queries=queries, steps=steps, on="test"))
                r = runs[-1]
                print(f"batch {b:3d} {m:10s} seed {s}: train loss {r['train_loss']:.4f} test acc {r['acc']:.3f}"
                      f"{' DIVERGED' if r['diverged'] else ''} ({r['seconds']:.1f} s)", flush=True)
    rows = []
    for b in args.batches:
        for m in ("mezo", "mezo-svrg"):
            rr = [r for r in runs if r["batch"] == b and r["method"] == m]
            fin = [r for r in rr if not r["diverged"]]
            stat = lambda k: ({"mean": statistics.mean(r[k] for r in fin),  # noqa: E731
                               "std": statistics.stdev(r[k] for r in fin) if len(fin) > 1 else 0.0} if fin else None)
            rows.append({"batch": b, "method": m, "rate": chosen[m], "seeds": len(rr),
                         "diverged": sum(r["diverged"] for r in rr), "train_loss": stat("train_loss"),
                         "test_acc": stat("acc"), "queries": queries})
    return {"setting": {"model": "MLP 64-32(tanh)-10", "data": "sklearn digits: 1150 train / 288 val / 359 test",
                        "queries": queries, "svrg_steps_at_64": args.steps, "q": 2, "mu": 1e-3,
                        "svrg_full_batch": n, "mezo_grid": args.mezo_grid,
                        "svrg_grid": [[k * SVRG_BASE[0], k * SVRG_BASE[1]] for k in args.svrg_grid],
                        "tune_batch": 64, "tune_seed": 0, "seeds": args.seeds},
            "tuning": tuning, "chosen": chosen, "rows": rows, "runs": runs}


def plot(result: dict, path: str) -> str:
    fig, axes = toys.figure(2, 10, 4)
    for m in ("mezo", "mezo-svrg"):
        runs = [r for r in result["runs"] if r["method"] == m]
        for ax, k in zip(axes, ("train_loss", "acc")):
            for bad, marker, label in ((False, "o", toys.LABELS[m]), (True, "x", f"{toys.LABELS[m]} diverged")):
                pts = [(r["batch"], r[k]) for r in runs if r["diverged"] == bad and math.isfinite(r[k])]
                if pts:
                    ax.scatter(*zip(*pts), marker=marker, color=toys.COLORS[m], alpha=0.7, label=label)
    axes[0].set_yscale("log")
    for ax, lab in zip(axes, ("final training loss", "test accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[0].legend()
    st = result["setting"]
    return toys.save_figure(fig, path, f"MLP on digits, {st['queries']:,} queries per run, rates tuned at batch 64: "
                            f"MeZO lr {result['chosen']['mezo']:g}, MeZO-SVRG (η1, η2) = "
                            f"({result['chosen']['mezo-svrg'][0]:g}, {result['chosen']['mezo-svrg'][1]:g})")


def put_into(ranking_json: str, result: dict) -> None:
    """The study's setting, chosen rates and rows under ranking.json's batch_sizes.mlp_digits (other keys kept)."""
    put_reserved(ranking_json, "--into", batch_sizes={"mlp_digits": {k: result[k] for k in ("setting", "chosen", "rows")}})


def _floats(text):
    return [float(x) for x in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="MeZO-SVRG steps at batch 64 (sets the query budget)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[8, 16, 32, 64])
    ap.add_argument("--mezo-grid", type=_floats, default=[2.5e-3, 5e-3, 1e-2, 2e-2])
    ap.add_argument("--svrg-grid", type=_floats, default=[0.25, 0.5, 1.0, 2.0],
                    help="factors of (eta1, eta2) = (3e-2, 1e-2)")
    ap.add_argument("--out", default=os.path.join("runs", "mlp_digits_batches"))
    ap.add_argument("--into", default=None, metavar="RANKING_JSON")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="run nothing: take the result of an earlier run's mlp_digits_batches.json (with --into)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except FinetuneError as e:      # a bad --into, a full disk: one line, the files as they were
        raise SystemExit(f"mlp_digits_batches: error: {e}") from None


def _run(args):
    if args.into:
        read(args.into, "--into")   # before the study: a typo must not cost it
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        if args.into:
            put_into(args.into, result)
        return result
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*falling back.*")
    os.makedirs(args.out, exist_ok=True)
    result = study(args)
    files.write_json(os.path.join(args.out, "mlp_digits_batches.json"), result)
    csv_path = os.path.join(args.out, "mlp_digits_batches.csv")
    keys = ["method", "batch", "seed", "steps", "queries", "train_loss", "acc", "diverged", "seconds"]
    toys.write_csv(csv_path, keys, [[r[k] for k in keys] for r in result["runs"]])
    png = plot(result, os.path.join(args.out, "mlp_digits_batches.png"))
    if args.into:
        put_into(args.into, result)
    for r in result["rows"]:
        tl, ta = r["train_loss"], r["test_acc"]
        print(f"batch {r['batch']:3d} {r['method']:10s} diverged {r['diverged']}/{r['seeds']}  "
              + (f"train loss {tl['mean']:.4f} ± {tl['std']:.4f}  test acc {ta['mean']:.3f} ± {ta['std']:.3f}"
                 if tl else "no finished run"))
    print(f"wrote {csv_path}, {png} and mlp_digits_batches.json")
    return result


if __name__ == "__main__":
    main()
