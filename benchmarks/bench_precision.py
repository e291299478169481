"""Half-precision drift of ZO perturb/restore: the naive way vs the fused passes vs exact restore.

    python benchmarks/bench_precision.py drift [--numel 65536] [--cycles 1000]
    python benchmarks/bench_precision.py train [--steps 200]

drift: K perturb/restore cycles at lr = 0 on bf16 weights ~ N(0, 0.02²), μ = 1e-3
(MeZO's +μ, −2μ, +μ with the same z).  Ideally the weights come back
bit-identical.  Variants:
  naive          the published code: z drawn in bf16, θ = θ + μ·z in bf16 ops (two roundings per touch)
  fused          noise_axpy_: fp32 in registers, one rounding per pass
  fused_sr       the same with stochastic rounding
  inverse        exact restore by inverting the rounding, no side plane
  plane2/4/8     exact restore with a residue plane of 2/4/8 bits per element
Reported: relative L2 distance from the start, fraction of elements bit-exact,
the fraction of elements whose inverse is ambiguous in one perturbation
(without a plane, and left unresolved by each plane width), and plane memory.

train: see zo_kernels.optim; N steps of MeZO and MeZO-SVRG in bf16 per
variant against the same seeds in float64.  Writes CSV and PNG to --out.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import zo_kernels  # noqa: E402
from zo_kernels import noise as N  # noqa: E402
from zo_kernels import restore as R  # noqa: E402

MU = 1e-3
DRIFT_VARIANTS = ("naive", "fused", "fused_sr", "inverse", "plane2", "plane4", "plane8")


def _naive_touch(p, key, coeff):
    z = N.normal(key, 0, p.numel(), device=p.device).to(p.dtype)
    p.copy_(p + (coeff * z))  # bf16 multiply then bf16 add, as `param.data + scale * z * eps` in bf16


def drift_cycle(variant, p, planes, key, backend):
    if variant == "naive":
        for c in (MU, -2 * MU, MU):
            _naive_touch(p, key, c)
    elif variant in ("fused", "fused_sr"):
        rounding = "stochastic" if variant == "fused_sr" else "nearest"
        for c in (MU, -2 * MU, MU):
            zo_kernels.noise_axpy_([p], [key], [c], rounding=rounding, backend=backend)
    else:
        zo_kernels.noise_axpy_([p], [key], [MU], undo=None if planes else [0.0], planes=planes, backend=backend)
        zo_kernels.noise_axpy_([p], [key], [-MU], undo=[MU], planes=planes, backend=backend)
        zo_kernels.noise_axpy_([p], [key], [0.0], undo=[-MU], planes=planes, backend=backend)


def ambiguity(theta0, seed=0):
    """Fraction of elements whose single +μ perturbation cannot be inverted uniquely, per plane width."""
    s = MU * N.normal(N.step_key(seed, 10**6), 0, theta0.numel(), device=theta0.device)
    y = (theta0.float() + s).to(theta0.dtype)
    out = {"inverse": R.invert(y, s)[1].double().mean().item()}
    for b in (2, 4, 8):
        r = R.to_ordered(theta0) & ((1 << b) - 1)
        out[f"plane{b}"] = R.invert(y, s, r, b)[1].double().mean().item()
    return out


def run_drift(args):
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    theta0 = (torch.randn(args.numel, generator=g) * 0.02).to(torch.bfloat16).to(device)
    amb = ambiguity(theta0, args.seed)
    rows = []
    checkpoints = sorted({c for c in (1, 10, 100, args.cycles) if c <= args.cycles})
    for variant in args.variants.split(","):
        p = theta0.clone()
        planes = R.make_planes([p], int(variant[5:])) if variant.startswith("plane") else None
        plane_bytes = sum(x.numel() for x in planes) if planes else 0
        t0 = time.perf_counter()
        for c in range(1, args.cycles + 1):
            drift_cycle(variant, p, planes, N.step_key(args.seed, c), args.backend)
            if c in checkpoints:
                rel = ((p.double() - theta0.double()).norm() / theta0.double().norm()).item()
                exact = (p.view(torch.int16) == theta0.view(torch.int16)).double().mean().item()
                row = dict(variant=variant, cycles=c, rel_l2=rel, bit_exact_fraction=exact,
                           ambiguous_per_perturbation=amb.get(variant, ""),
                           plane_bytes_per_element=plane_bytes / args.numel, numel=args.numel,
                           backend=zo_kernels.last_backend() if variant != "naive" else "torch-bf16",
                           seconds=time.perf_counter() - t0)
                rows.append(row)
                print(f"{variant:9s} cycles={c:5d} rel_l2={rel:.3e} bit-exact={exact:.5f} "
                      f"ambiguous/perturbation={row['ambiguous_per_perturbation'] if row['ambiguous_per_perturbation'] == '' else format(row['ambiguous_per_perturbation'], '.2e')} "
                      f"plane={plane_bytes / args.numel:.3f} B/elem", flush=True)
    return rows


def write(rows, out: pathlib.Path, name: str, plot):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plot(plt, rows)
    fig.savefig(out / f"{name}.png", dpi=120)
    print(f"wrote {out / (name + '.csv')} and {out / (name + '.png')}")


def plot_drift(plt, rows):
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for v in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["cycles"], r["rel_l2"], 1 - r["bit_exact_fraction"]) for r in rows if r["variant"] == v]
        c, rel, inexact = zip(*pts)
        ax[0].plot(c, [max(x, 1e-9) for x in rel], marker="o", label=v)
        ax[1].plot(c, [max(x, 1e-7) for x in inexact], marker="o", label=v)
    ax[0].set(xscale="log", yscale="log", xlabel="perturb/restore cycles (lr = 0)", ylabel="relative L2 drift")
    ax[1].set(xscale="log", yscale="log", xlabel="perturb/restore cycles (lr = 0)",
              ylabel="fraction of elements not bit-exact")
    for a in ax:
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    fig.suptitle(f"bf16 drift, {rows[0]['numel']} weights ~N(0, 0.02²), μ = {MU}")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------- training
TRAIN_VARIANTS = ("naive", "fused", "fused_sr", "exact", "exact_sr", "exact8")


def _digits(device):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32, device=device)
    return x, torch.tensor(y, device=device)


def _mlp(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 64), (32,), (10, 32), (10,)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * (0.1 if len(s) == 2 else 0.0)).to(dtype).to(device))
            for s in shapes]


@torch.no_grad()
def _loss(params, x, y):
    w1, b1, w2, b2 = (p.to(torch.float64 if p.dtype == torch.float64 else torch.float32) for p in params)
    h = torch.relu(x.to(w1.dtype) @ w1.T + b1)
    return torch.nn.functional.cross_entropy(h @ w2.T + b2, y)


def _z(params, seed, t):
    """z of step t for each parameter (tensor id = position), as the optimizers regenerate it."""
    k = N.step_key(seed, t)
    return [N.normal(k, tid, p.numel(), device=p.device).view_as(p) for tid, p in enumerate(params)]


def run_train(args):
    from zo_kernels.optim import MeZO, MeZOSVRG, naive

    device = torch.device(args.device)
    x, y = _digits(device)
    n_train = 1024
    xt, yt = x[:n_train], y[:n_train]
    rows = []
    for algo in ("mezo", "mezo-svrg"):
        runs = {}
        for variant in ("float64",) + TRAIN_VARIANTS:
            dtype = torch.float64 if variant == "float64" else torch.bfloat16
            params = _mlp(dtype, device, args.seed)
            g = torch.Generator().manual_seed(args.seed + 1)
            batch = {}
            closure = lambda: _loss(params, xt[batch["i"]], yt[batch["i"]])
            full = lambda: _loss(params, xt, yt)
            kw = dict(rounding="stochastic" if variant.endswith("_sr") else "nearest",
                      restore="fused" if variant.startswith("fused") else "exact",
                      plane_bits=8 if variant == "exact8" else 2, backend=args.backend, seed=args.seed)
            if variant == "float64":
                kw = dict(seed=args.seed)
            opt = None
            if variant != "naive":
                opt = (MeZO(params, lr=args.lr, eps=MU, **kw) if algo == "mezo" else
                       MeZOSVRG(params, lr=args.lr / 2, lr_full=args.lr, eps=MU, q=args.q, **kw))
            state = {}
            curve = []
            t0 = time.perf_counter()
            for t in range(args.steps):
                batch["i"] = torch.randint(0, n_train, (64,), generator=g).to(device)
                if variant == "naive":      # the published code's steps (zo_kernels.optim.naive), in bf16
                    z = _z(params, args.seed, t)
                    if algo == "mezo":
                        loss = naive.mezo_published_step(params, z, closure, lr=args.lr, mu=MU)
                    else:
                        if t % args.q == 0:
                            state["t_a"] = t
                        loss = naive.mezo_svrg_published_step(
                            params, t, z, closure, full, state, lr=args.lr / 2, lr_full=args.lr, mu=MU, q=args.q,
                            za_of=lambda: _z(params, args.seed, state["t_a"]))
                else:
                    loss = opt.step(closure) if algo == "mezo" else opt.step(closure, full)
                curve.append(loss)
            runs[variant] = ([p.detach().double().clone() for p in params], curve)
            with torch.no_grad():
                train_loss = float(_loss(params, xt, yt))
            truth = runs["float64"][0]
            flat = torch.cat([p.reshape(-1) for p in runs[variant][0]])
            flat64 = torch.cat([p.reshape(-1) for p in truth])
            start = torch.cat([p.reshape(-1).double() for p in _mlp(torch.float64, device, args.seed)])
            row = dict(algorithm=algo, variant=variant, steps=args.steps,
                       rel_l2_from_float64=((flat - flat64).norm() / (flat64 - start).norm()).item(),
                       train_loss=train_loss, seconds=time.perf_counter() - t0)
            rows.append(row)
            print(f"{algo:9s} {variant:8s} distance from float64 / distance travelled = "
                  f"{row['rel_l2_from_float64']:.3e}   full-train loss {train_loss:.4f}", flush=True)
    return rows


def plot_train(plt, rows):
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for a, algo in zip(ax, ("mezo", "mezo-svrg")):
        sel = [r for r in rows if r["algorithm"] == algo and r["variant"] != "float64"]
        a.bar([r["variant"] for r in sel], [r["rel_l2_from_float64"] for r in sel])
        a.set(yscale="log", title=f"{algo}: bf16 vs float64 after {sel[0]['steps']} steps",
              ylabel="|θ_bf16 − θ_f64| / |θ_f64 − θ_0|")
        a.tick_params(axis="x", rotation=30)
        a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("drift")
    d.add_argument("--numel", type=int, default=1 << 16)
    d.add_argument("--cycles", type=int, default=1000)
    d.add_argument("--variants", default=",".join(DRIFT_VARIANTS))
    tr = sub.add_parser("train")
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--q", type=int, default=5)
    for p in (d, tr):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--backend", default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.what == "drift":
        write(run_drift(args), pathlib.Path(args.out), "bench_precision_drift", plot_drift)
    else:
        write(run_train(args), pathlib.Path(args.out), "bench_precision_train", plot_train)


if __name__ == "__main__":
    main()
