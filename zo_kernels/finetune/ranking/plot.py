"""ranking.png: each ranked method's test accuracy (mean over its seeds, at its chosen rate) against queries
and against training seconds -- the curves behind the equal-queries and equal-time columns -- from
ranking.json alone."""
from __future__ import annotations

from typing import List, Tuple

from ..files import save_figure
from ..registry import METHODS


def mean_curve(seeds: List[dict], key: str) -> Tuple[List[float], List[float]]:
    """(x, mean test accuracy) over the seeds' eval points, x = `key` (queries or train_s) averaged per point;
    the seeds of one method share their eval points' query counts (the points stop at the shortest curve)."""
    n = min(len(s["curve"]) for s in seeds)
    xs = [sum(s["curve"][i][key] for s in seeds) / len(seeds) for i in range(n)]
    ys = [sum(s["curve"][i]["test_acc"] for s in seeds) / len(seeds) for i in range(n)]
    return xs, ys


def plot(ranking: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    for m in ranking["order"]:
        e = ranking["methods"][m]
        style = "--" if e["kind"] == "fo" else "-"
        color = METHODS[m].color if m in METHODS else None
        for ax, key in zip(axes, ("queries", "train_s")):
            ax.plot(*mean_curve(e["seeds"], key), style, marker="o", ms=3, color=color, label=e["label"])
    st = ranking["settings"]
    if st.get("equal_time_s") is not None:
        axes[1].axvline(st["equal_time_s"], color="gray", ls=":", lw=1, label="equal time")
    axes[0].set_xlabel("queries (forward passes of one example)")
    axes[1].set_xlabel(f"training seconds ({st['threads_per_run']} thread(s) per run, {st['lanes']} run(s) side by side)")
    for ax in axes:
        ax.set_ylabel(f"test accuracy (mean of {len(st['seeds'])} seeds)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Ranking: each method at its tuned rate, {st['queries']:,} queries (FO dashed: as many forward "
                 "examples)", fontsize=9)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
    return path
