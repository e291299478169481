"""The end-of-run table (terminal and results.json) and curves.png."""
from __future__ import annotations

import math
from typing import Dict, List

from .methods import LABELS

COLORS = {"mezo": "tab:blue", "mezo-svrg": "tab:red", "fo-sgd": "tab:green", "fo-adam": "tab:purple"}


def _fmt(x, spec: str, na: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return na
    return format(x, spec)


def table(methods: Dict[str, dict], memory: Dict[str, dict]) -> str:
    head = ["method", "queries", "steps", "train loss", "val acc", "test acc", "wall s", "fwd ms/step",
            "noise ms/step", "peak MB", "x inf", "x inf-rt"]
    rows: List[List[str]] = []
    for m, r in methods.items():
        ts = r["time_per_step_ms"]
        mem = memory.get(m, {})
        rows.append([LABELS.get(m, m), str(r["queries"]), str(r["steps"]), _fmt(r["train_loss"], ".4f"),
                     _fmt(r["val_acc"], ".3f"), _fmt(r["test_acc"], ".3f"), _fmt(r["wall_s"], ".0f"),
                     _fmt(ts.get("forward"), ".0f"),
                     _fmt(ts.get("noise"), ".0f") if m.startswith("mezo") else
                     ("bwd+upd " + _fmt(ts.get("backward_update"), ".0f")),
                     _fmt(mem.get("peak_rss_mb") if mem.get("cuda_peak_mb") is None else mem.get("cuda_peak_mb"),
                          ".0f"),
                     _fmt(mem.get("x_inference") if mem.get("cuda_peak_mb") is None else mem.get("cuda_x_inference"),
                          ".2f"),
                     _fmt(mem.get("x_inference_above_runtime"), ".2f")])
    for k in ("inference", "runtime"):
        mem = memory.get(k)
        if mem and "peak_rss_mb" in mem:
            rows.append([f"({k})", "", "", "", "", "", "", "", "",
                         _fmt(mem.get("cuda_peak_mb", mem.get("peak_rss_mb")), ".0f"),
                         _fmt(mem.get("x_inference", mem.get("cuda_x_inference")), ".2f"),
                         _fmt(mem.get("x_inference_above_runtime"), ".2f")])
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def _smooth(xs, ys, window: int):
    out_x, out_y = [], []
    for i in range(len(ys)):
        lo = max(0, i - window + 1)
        out_x.append(xs[i])
        out_y.append(sum(ys[lo:i + 1]) / (i + 1 - lo))
    return out_x, out_y


def plot(methods: Dict[str, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zo = [m for m in methods if m.startswith("mezo")]
    zoom = bool(zo) and len(zo) < len(methods)  # a ZO-only panel when FO lines squash the ZO ones
    n = 3 if zoom else 2
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.6))
    ax1, ax2 = axes[0], axes[-1]
    for m, r in methods.items():
        c = COLORS.get(m)
        label = LABELS.get(m, m)
        curve = r["curve"]
        qx = [p["queries"] for p in curve]
        # faint: running mean of the per-step losses (minibatch steps only for SVRG)
        steps = [s for s in r["step_losses"] if not s[2]]
        if steps:
            xs, ys = _smooth([s[0] for s in steps], [s[1] for s in steps], 20)
            ax1.plot(xs, ys, color=c, alpha=0.25, lw=1)
        ax1.plot(qx, [p["train_loss"] for p in curve], "o-", color=c, label=label, ms=4)
        if zoom and m in zo:
            axes[1].plot(qx, [p["train_loss"] for p in curve], "o-", color=c, label=label, ms=4)
        ax2.plot(qx, [p["test_acc"] for p in curve], "o-", color=c, label=label, ms=4)
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss (markers: whole train set; faint: minibatch, mean of 20 steps)", fontsize=9)
    if zoom:
        axes[1].set_ylabel("training loss (whole train set)")
        axes[1].set_title("training loss, ZO methods only (zoom)", fontsize=9)
    ax2.set_ylabel("test accuracy")
    ax2.set_title("test accuracy", fontsize=9)
    for ax in axes:
        ax.set_xlabel("queries (forward passes of one example)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
