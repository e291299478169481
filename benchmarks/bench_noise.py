"""Kernel microbenchmark of the primitive: fused noise_axpy_ per backend vs the PyTorch baselines.

    python benchmarks/bench_noise.py [--sizes 1e5,1e6,1e7] [--keys 1,2,4] [--dtypes float32,bfloat16]
                                     [--noise gaussian,rademacher] [--threads 1]
    python benchmarks/bench_noise.py --lowrank [--shapes 2048x2048] [--ranks 1,2,4,8,16]

Per (size, dtype, k keys) it times, in one process:
  mezo_randn   MeZO's way: per key, z = torch.randn_like(θ) (a full temporary), θ.add_(z, alpha)
  mezo_normal  the same with torch.normal(0, 1, size) as the published code writes it
  reference    this package's pure-PyTorch reference (the oracle, not meant to be fast)
  <backend>    every native backend available for the device (triton, cpu, cuda)
  <backend>_rademacher  the same pass with noise="rademacher" (±1 signs, docs/spec.md §9), for the
               backends that implement it; its speedup_vs_gaussian is the Gaussian row's time over its own
  copy_        (CUDA) θ.copy_(other): one read + one write, the roofline of an in-place op
and prints ns/element, GB/s (θ read + written once) and ratios against the
baselines measured in the same run.  Writes CSV and PNG to --out.

--lowrank times LOZO's perturbation pass θ ← θ + a·U Vᵀ of one (m, n) matrix per rank r, in one process:
  lowrank_<backend>  the fused low-rank pass (lowrank_noise_axpy_: U, V regenerated from their keys)
  lowrank_cpu_base   the same on the CPU kernel's baseline instruction-set build (where a wider one runs)
  fullrank_<backend> the fused full-rank pass noise_axpy_ on the same matrix (MeZO's perturbation)
  lozo_uvt           the authors' way: u = torch.randn(m, r) after torch.manual_seed, V kept in memory,
                     param.data = param.data + a * (u @ v.t())  (out of place, θ-sized temporaries)
and writes bench_noise_lowrank.csv / .png.

--adam times one fused ZO-Adam step (noise_adam_: θ, m, v read and written once, z from the keys) per
(size, dtype, k keys), in one process:
  adam_cpu_<isa>   the CPU pass on each instruction-set build this CPU runs (base, avx2, avx512)
  adam_<backend>   every other native backend for the device (triton, cuda)
  adam_reference   this package's PyTorch reference of the pass (zo_kernels.adam.noise_adam_reference)
  torch_adam       ZO-Bench's way: p.grad = Σ_j c_j·torch.randn_like(p), then torch.optim.Adam.step()
with ratios against the baseline build (adam_cpu_base), the reference and torch_adam, and writes
bench_noise_adam.csv / .png.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_utils import bench_device, time_fn, write_line_figure  # noqa: E402

import zo_kernels  # noqa: E402
from zo_kernels import backends, native  # noqa: E402
from zo_kernels.noise import step_key  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def methods(p, keys, alphas, device, forms=("gaussian",)):
    out = {}

    def mezo_randn():
        for a in alphas:
            p.add_(torch.randn_like(p), alpha=a)

    def mezo_normal():
        for a in alphas:
            p.add_(torch.normal(0.0, 1.0, size=p.shape, device=device, dtype=p.dtype), alpha=a)

    out["mezo_randn"] = mezo_randn
    out["mezo_normal"] = mezo_normal
    for name in backends.available_backends():
        b = backends.get(name)
        if device.type not in b.devices or p.dtype not in b.dtypes:
            continue
        if name == "triton" and b.notes.get("interpreter"):
            continue  # the interpreter is a correctness tool, not a timing target
        for form in forms:
            if form in b.noise_forms and (name != "reference" or form == "gaussian"):
                out[method_name(name, form)] = (lambda n=name, f=form: zo_kernels.noise_axpy_([p], keys, alphas,
                                                                                            backend=n, noise=f))
    if device.type == "cuda":
        other = torch.empty_like(p)
        out["copy_"] = lambda: p.copy_(other)
    return out


def method_name(backend, noise):
    """A backend's row name for a noise form: the Gaussian rows keep the backend's name."""
    return backend if noise == "gaussian" else f"{backend}_{noise}"


def sweep(args):
    """(dtype name, dtype, k, the k keys, k alternating signs, numel) of every point of the sweep."""
    for dname in args.dtypes.split(","):
        for k in [int(x) for x in args.keys.split(",")]:
            keys = [step_key(args.seed, s) for s in range(k)]
            for n in [int(float(s)) for s in args.sizes.split(",")]:
                yield dname, DTYPES[dname], k, keys, [(-1) ** s for s in range(k)], n


def run(args):
    device = bench_device(args)
    rows = []
    for dname, dtype, k, keys, signs, n in sweep(args):
        alphas = [1e-3 * s for s in signs]
        p = torch.randn(n, device=device).to(dtype)
        times = {}
        for name, fn in methods(p, keys, alphas, device, args.noise.split(",")).items():
            if name == "reference" and n > args.max_reference:
                continue
            times[name] = time_fn(fn, device, stat=args.stat)
        nbytes = 2 * n * p.element_size()
        for name, t in times.items():
            gaussian = name.removesuffix("_rademacher")
            row = dict(device=str(device), threads=torch.get_num_threads(), cpu_isa=native.cpu_isa(), dtype=dname,
                       keys=k, numel=n, method=name, seconds=t, ns_per_element=t / n * 1e9, gbps=nbytes / t / 1e9,
                       speedup_vs_reference=times["reference"] / t if "reference" in times else "",
                       speedup_vs_mezo_randn=times["mezo_randn"] / t,
                       pct_of_copy_bandwidth=100 * times["copy_"] / t if "copy_" in times else "",
                       speedup_vs_gaussian=times[gaussian] / t if gaussian != name and gaussian in times else "")
            rows.append(row)
            print(f"{dname:9s} k={k} n={n:>10,d} {name:18s} {row['ns_per_element']:9.2f} ns/el "
                  f"{row['gbps']:8.2f} GB/s  x{row['speedup_vs_mezo_randn']:6.2f} vs randn+add_"
                  + (f"  x{row['speedup_vs_reference']:7.1f} vs reference" if row['speedup_vs_reference'] != "" else "")
                  + (f"  {row['pct_of_copy_bandwidth']:5.1f}% of copy_" if row['pct_of_copy_bandwidth'] != "" else "")
                  + (f"  x{row['speedup_vs_gaussian']:5.2f} vs Gaussian" if row['speedup_vs_gaussian'] != "" else ""),
                  flush=True)
    return rows


def write(rows, out: pathlib.Path):
    write_line_figure(rows, out, "bench_noise", panel_keys=("dtype", "keys"), xkey="numel", xlabel="elements",
                      width=4.2, title=lambda dt, k: f"{dt}, {k} key(s)",
                      suptitle=f"noise_axpy_ on {rows[0]['device']} ({rows[0]['threads']} threads): lower is better")


ADAM_KW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, step=10)


def adam_methods(n, dtype, keys, coeffs, device):
    """{name: (fn, isa)} for one Adam step on n elements of dtype; every method updates its own θ, m, v;
    isa: the CPU kernel's instruction set to time fn on (None: as it is)."""
    def state():
        p = torch.randn(n, device=device).to(dtype)
        return p, torch.zeros(n, device=device), torch.full((n,), 1e-4, device=device)

    def fused(backend):
        p, m, v = state()
        return lambda: zo_kernels.noise_adam_([p], [m], [v], keys, coeffs, backend=backend, **ADAM_KW)

    out = {}
    for name in backends.available_backends():
        b = backends.get(name)
        if device.type not in b.devices or dtype not in b.dtypes or b.adam is None:
            continue
        if name == "triton" and b.notes.get("interpreter"):
            continue
        if name == "cpu":
            for isa in native.cpu_isas():
                out[f"adam_cpu_{isa}"] = (fused("cpu"), isa)
        else:
            out[f"adam_{name}"] = (fused(name), None)

    p, _, _ = state()
    opt = torch.optim.Adam([p], lr=ADAM_KW["lr"], betas=ADAM_KW["betas"], eps=ADAM_KW["eps"])

    def torch_adam():
        g = torch.zeros_like(p)
        for c in coeffs:
            g.add_(torch.randn_like(p), alpha=c)
        p.grad = g
        opt.step()

    out["torch_adam"] = (torch_adam, None)
    return out


def run_adam(args):
    device = bench_device(args)
    rows = []
    for dname, dtype, k, keys, signs, n in sweep(args):
        times = {}
        for name, (fn, isa) in adam_methods(n, dtype, keys, [0.5 * s for s in signs], device).items():
            if name == "adam_reference" and n > args.max_reference:
                continue
            if isa is None:
                times[name] = time_fn(fn, device)
            else:
                with native.on_isa(isa):
                    times[name] = time_fn(fn, device)
        nbytes = 2 * n * (dtype.itemsize + 8)    # θ, m, v read and written once

        def ratio(base, t):
            return times[base] / t if base in times else ""

        for name, t in times.items():
            row = dict(device=str(device), threads=torch.get_num_threads(), dtype=dname, keys=k, numel=n,
                       method=name, seconds=t, ns_per_element=t / n * 1e9, gbps=nbytes / t / 1e9,
                       speedup_vs_cpu_base=ratio("adam_cpu_base", t), speedup_vs_reference=ratio("adam_reference", t),
                       speedup_vs_torch_adam=ratio("torch_adam", t))
            rows.append(row)
            print(f"{dname:9s} k={k} n={n:>10,d} {name:16s} {row['ns_per_element']:9.2f} ns/el "
                  f"{row['gbps']:7.2f} GB/s  x{row['speedup_vs_torch_adam']:6.2f} vs torch Adam"
                  + (f"  x{row['speedup_vs_cpu_base']:5.2f} vs cpu base" if row['speedup_vs_cpu_base'] != "" else "")
                  + (f"  x{row['speedup_vs_reference']:6.1f} vs reference"
                     if row['speedup_vs_reference'] != "" else ""), flush=True)
    return rows


def write_adam(rows, out: pathlib.Path):
    write_line_figure(rows, out, "bench_noise_adam", panel_keys=("dtype", "keys"), xkey="numel", xlabel="elements",
                      width=4.2, title=lambda dt, k: f"{dt}, {k} key(s)",
                      suptitle=f"fused ZO-Adam step on {rows[0]['device']} ({rows[0]['threads']} threads): "
                               "lower is better")


def lowrank_methods(p, r, device):
    m = p.shape[0]
    ku, kv = step_key(1, 2), step_key(1, 0)
    v = torch.randn(p.shape[1], r, device=device, dtype=p.dtype)   # LOZO keeps V in memory
    out = {}

    def lozo_uvt():
        torch.manual_seed(3)
        u = torch.randn(m, r, device=device, dtype=p.dtype)
        p.data = p.data + 1e-3 * (u @ v.t())

    out["lozo_uvt"] = lozo_uvt
    for name in backends.available_backends():
        b = backends.get(name)
        if device.type not in b.devices or p.dtype not in b.dtypes or name == "reference":
            continue
        if name == "triton" and b.notes.get("interpreter"):
            continue
        if b.lowrank is not None:
            out[f"lowrank_{name}"] = (lambda n=name: zo_kernels.lowrank_noise_axpy_([p], [ku], kv, [1e-3], rank=r,
                                                                                    backend=n))
        if name == "cpu" and b.notes.get("isa", "base") != "base":
            def lowrank_cpu_base():
                with native.on_isa("base"):
                    zo_kernels.lowrank_noise_axpy_([p], [ku], kv, [1e-3], rank=r, backend="cpu")

            out["lowrank_cpu_base"] = lowrank_cpu_base
        out[f"fullrank_{name}"] = (lambda n=name: zo_kernels.noise_axpy_([p], [ku], [1e-3], backend=n))
    return out


def run_lowrank(args):
    device = bench_device(args)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for shape in args.shapes.split(","):
            m, n = (int(x) for x in shape.lower().split("x"))
            full = {}
            for r in [int(x) for x in args.ranks.split(",")]:
                p = torch.randn(m, n, device=device).to(dtype)
                times = {}
                for name, fn in lowrank_methods(p, r, device).items():
                    if name.startswith("fullrank_") and name in full:
                        times[name] = full[name]      # rank-independent: timed once per shape
                        continue
                    times[name] = time_fn(fn, device)
                    if name.startswith("fullrank_"):
                        full[name] = times[name]
                for name, t in times.items():
                    fused_full = [v for k, v in times.items() if k.startswith("fullrank_")]
                    row = dict(device=str(device), threads=torch.get_num_threads(), dtype=dname, shape=f"{m}x{n}",
                               rank=r, method=name, seconds=t, ns_per_element=t / (m * n) * 1e9,
                               speedup_vs_lozo_uvt=times["lozo_uvt"] / t,
                               speedup_vs_fullrank=min(fused_full) / t if fused_full else "")
                    rows.append(row)
                    print(f"{dname:9s} {m}x{n} r={r:<2d} {name:16s} {row['ns_per_element']:8.3f} ns/el  "
                          f"x{row['speedup_vs_lozo_uvt']:6.2f} vs u@v.t()"
                          + (f"  x{row['speedup_vs_fullrank']:6.2f} vs full-rank fused" if fused_full else ""),
                          flush=True)
    return rows


def write_lowrank(rows, out: pathlib.Path):
    write_line_figure(rows, out, "bench_noise_lowrank", panel_keys=("dtype", "shape"), xkey="rank", xlabel="rank r",
                      width=4.6, title=lambda dt, sh: f"{dt}, {sh}", xticks=True,
                      suptitle=f"low-rank perturbation pass on {rows[0]['device']} ({rows[0]['threads']} threads): "
                               "lower is better")


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--sizes", default="1e5,1e6,1e7,1e8" if cuda else "1e5,1e6,1e7")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--keys", default="1,2,4")
    ap.add_argument("--noise", default="gaussian,rademacher",
                    help="noise forms of the backends' rows (the baselines are Gaussian)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--isa", default="", help="pin the CPU kernel to one instruction-set build (base, avx2, avx512)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per-call time reported (min: the fastest call, for a machine shared with other jobs)")
    ap.add_argument("--max-reference", type=float, default=1e7, help="skip the slow reference above this size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lowrank", action="store_true", help="time the low-rank (LOZO) pass instead")
    ap.add_argument("--adam", action="store_true", help="time the fused ZO-Adam pass instead")
    ap.add_argument("--shapes", default="4096x4096" if cuda else "2048x2048", help="--lowrank: matrices m x n")
    ap.add_argument("--ranks", default="1,2,4,8,16", help="--lowrank: ranks")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    args.max_reference = int(args.max_reference)
    print(f"backends available: {backends.available_backends()}")
    if args.lowrank:
        write_lowrank(run_lowrank(args), pathlib.Path(args.out))
        return
    if args.adam:
        write_adam(run_adam(args), pathlib.Path(args.out))
        return
    with native.on_isa(args.isa or native.cpu_isa()):
        write(run(args), pathlib.Path(args.out))


if __name__ == "__main__":
    main()
