"""Cost of `snapshot=True` (bit-identical weights after a failed step) on a MeZO step.

    python benchmarks/bench_snapshot.py [--numel 4194304] [--dtypes float32,bfloat16] [--repeats 15]

Times the noise work of one MeZO step (the closure reads one element, so the step is all noise passes)
with snapshot off and on, in the same process, and prints the ratio; the extra memory is the snapshot
copy's bytes (trainable weights once more, held for the duration of the step).  Writes CSV and PNG to
benchmarks/results/ (git-ignored) unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
from zo_kernels.optim import MeZO  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _setup(dtype, numel, snapshot, backend):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter((torch.randn(numel // 4) * 0.02).to(dtype)) for _ in range(4)]
    opt = MeZO(ps, lr=1e-6, eps=1e-3, backend=backend, snapshot=snapshot)
    closure = lambda: ps[0][0].double() ** 2           # noqa: E731 (noise work only)
    opt.step(closure)                                   # warm-up (allocates the snapshot copy)
    return ps, opt, closure


def time_steps(dtype, numel, repeats, backend):
    """Median ms per step without and with snapshot, interleaved so machine load hits both alike."""
    runs = [_setup(dtype, numel, snap, backend) for snap in (False, True)]
    times = ([], [])
    for _ in range(repeats):
        for (_, opt, closure), out in zip(runs, times):
            t0 = time.perf_counter()
            opt.step(closure)
            out.append(time.perf_counter() - t0)
    nbytes = sum(p.numel() * p.element_size() for p in runs[0][0])
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, nbytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 22)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--backend", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    rows = []
    for name in args.dtypes.split(","):
        base_ms, snap_ms, nbytes = time_steps(DTYPES[name], args.numel, args.repeats, args.backend)
        rows.append({"dtype": name, "numel": args.numel, "threads": torch.get_num_threads(),
                     "step_ms": round(base_ms, 2), "step_snapshot_ms": round(snap_ms, 2),
                     "ratio": round(snap_ms / base_ms, 3), "snapshot_mb": round(nbytes / 2 ** 20, 1)})
        print(f"{name:9s} {args.numel} elems: step {base_ms:8.1f} ms, with snapshot {snap_ms:8.1f} ms "
              f"(x{snap_ms / base_ms:.3f}), snapshot memory {nbytes / 2 ** 20:.1f} MiB (= the weights)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "snapshot.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["step_ms"] for r in rows], 0.4, label="snapshot=False")
    ax.bar([i + 0.2 for i in x], [r["step_snapshot_ms"] for r in rows], 0.4, label="snapshot=True")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["dtype"] for r in rows])
    ax.set_ylabel(f"ms per MeZO step ({args.numel} elements)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "snapshot.png"), dpi=110)
    print(f"wrote {os.path.join(args.out, 'snapshot.csv')} and snapshot.png")


if __name__ == "__main__":
    main()
