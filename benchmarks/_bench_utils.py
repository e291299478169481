"""Shared pieces of the benchmark scripts (bench_noise.py, bench_lozo_forward.py): timing, the CPU
thread setting, CSV writing and the matplotlib figures (log-log lines of ns/element per method)."""
from __future__ import annotations

import csv
import pathlib
import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, min_time=0.3, max_reps=50, stat="median"):
    """Median (stat="min": fastest) seconds per call after one warm-up; repeats until min_time is spent.
    The fastest call estimates the uncontended time on a shared machine, where a low-priority process
    loses whole time slices to others."""
    fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > 2.0 and len(times) >= 1:
            break
    return min(times) if stat == "min" else statistics.median(times)


def bench_device(args) -> torch.device:
    """args.device, with args.threads CPU threads when it is the CPU (0: torch's default)."""
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    return device


def write_csv(rows, path: pathlib.Path) -> None:
    """rows (dicts with the same keys) as a CSV with a header; creates the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def pyplot():
    """matplotlib.pyplot without a display, or None (said once) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: CSV only")
        return None
    return plt


def line_panels(plt, rows, panel_keys: tuple[str, ...], xkey: str, xlabel: str, width: float):
    """One log-log panel per distinct value of panel_keys, a line of ns_per_element against xkey per
    method.  Returns the figure and [(axis, panel values)] for the caller's titles."""
    def panel_of(r):
        return tuple(r[k] for k in panel_keys)

    panels = sorted({panel_of(r) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for m in sorted({r["method"] for r in rows}):
            pts = [(r[xkey], r["ns_per_element"]) for r in rows if panel_of(r) == panel and r["method"] == m]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="ns / element")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return fig, list(zip(axes[0], panels))


def write_line_figure(rows, out: pathlib.Path, stem: str, *, panel_keys: tuple[str, ...], xkey: str, xlabel: str,
                      width: float, title, suptitle: str, xticks: bool = False) -> None:
    """out/stem.csv, and out/stem.png of line_panels (title(*panel values) over each panel; xticks: one
    labelled tick per x value, for few discrete x such as ranks)."""
    write_csv(rows, out / f"{stem}.csv")
    plt = pyplot()
    if plt is None:
        return
    fig, panels = line_panels(plt, rows, panel_keys, xkey, xlabel, width)
    xs = sorted({r[xkey] for r in rows})
    for ax, panel in panels:
        ax.set(title=title(*panel))
        if xticks:
            ax.set_xticks(xs, [str(x) for x in xs])
    fig.suptitle(suptitle)
    save_figure(plt, fig, out / f"{stem}.csv", out / f"{stem}.png")


def save_figure(plt, fig, csv_path: pathlib.Path, png_path: pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    print(f"wrote {csv_path} and {png_path}")
