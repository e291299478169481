"""The end-of-run summary over seeds (mean ± std), its tables (terminal, results.json) and curves.png.

Time-to-accuracy (the MeZO-SVRG paper's Table 4 in miniature): per seed, MeZO's peak is its best
test accuracy over the eval points after the start; every method's "to MeZO peak" is the first
eval point whose test accuracy reaches it -- the queries and the training seconds (evaluation
excluded) spent until then -- or "not reached".
"""
from __future__ import annotations

import math
import textwrap
from typing import Dict, List, Optional

from .files import save_figure
from .registry import LABELS, METHODS


def _color(m: str) -> Optional[str]:
    return METHODS[m].color if m in METHODS else None


def stats(values: List[float]) -> dict:
    """mean, sample std (0 for one value) and the values, Nones left out."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "values": []}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "values": v}


def tuning_name(cfg: dict) -> str:
    """Which weights were trained, from a run's config (argparse fields): full, partial, BitFit, LoRA, prefix,
    QZO (quantization scales)."""
    if cfg.get("train") == "scales":
        return f"QZO {cfg.get('quantize')} scales"
    if cfg.get("peft") == "lora":
        return f"LoRA r={cfg.get('lora_rank')}" + (f" over {cfg['quantize']}" if cfg.get("quantize") else "")
    if cfg.get("peft") == "prefix":
        return f"prefix ({cfg.get('prefix_tokens')} tokens)"
    if cfg.get("bitfit"):
        return "BitFit"
    return f"partial (last {cfg['partial']})" if cfg.get("partial") else "full"


def plot_title(cfg: dict, machine: dict) -> str:
    """curves.png's title from results.json's "config" and "machine" (zo-finetune and merge_seeds)."""
    seeds = cfg.get("seeds") or [cfg.get("seed")]
    seeds_txt = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over seeds {','.join(map(str, seeds))}"
    return (f"{cfg.get('model_name')}, {cfg.get('head')} head, on {cfg.get('dataset_name')}, {cfg.get('n_train')} "
            f"train / {cfg.get('n_test')} test; batch {cfg.get('batch_size')}, {tuning_name(cfg)} FT, objective "
            f"{cfg.get('objective')}; {seeds_txt}; {machine.get('name') or machine.get('cpu')}")


def reach(curve: List[dict], target: float) -> Optional[dict]:
    """The first eval point after the start with test accuracy >= target, or None."""
    for p in curve[1:]:
        if p["test_acc"] >= target - 1e-12:
            return p
    return None


def peak(rec: Optional[dict]) -> Optional[float]:
    """A run's peak: its best test accuracy over the eval points after the start (None: no such point)."""
    return max(p["test_acc"] for p in rec["curve"][1:]) if rec and len(rec["curve"]) > 1 else None


def to_peak(recs: List[dict], peaks: List[Optional[float]]) -> Optional[dict]:
    """Runs `recs` (one per seed) against the peaks of the same seeds: how many reach theirs, and the
    queries and training seconds until they do (mean ± std over those that do); None without any peak."""
    if all(pk is None for pk in peaks):
        return None
    hits = [None if pk is None else reach(x["curve"], pk) for x, pk in zip(recs, peaks)]
    got = [h for h in hits if h is not None]
    return {"reached": len(got), "of": len(hits), "queries": stats([h["queries"] for h in got]),
            "train_s": stats([h["train_s"] for h in got])}


def aggregate(runs: List[dict]) -> dict:
    """Per method: mean ± std over the runs (seeds) of the final numbers, the time to MeZO's peak,
    and the mean ± std curve (eval points are at the same query counts for every seed)."""
    methods = list(runs[0]["methods"])
    out = {"seeds": [r["seed"] for r in runs], "n": len(runs),
           "start": {k: stats([r["start"][k] for r in runs]) for k in ("test_acc", "train_loss")},
           "methods": {}}
    peaks = [peak(r["methods"].get("mezo")) for r in runs]
    out["mezo_peak"] = stats(peaks)
    for m in methods:
        recs = [r["methods"][m] for r in runs]
        e = {"label": LABELS.get(m, recs[0].get("label", m)), "kind": recs[0].get("kind"),
             "queries": recs[0]["queries"], "steps": recs[0]["steps"], "full_steps": recs[0].get("full_steps", 0),
             "diverged": sum(bool(x["diverged"]) for x in recs)}
        for k in ("test_acc", "best_test_acc", "train_loss", "val_acc", "wall_s", "train_s", "eval_s"):
            e[k] = stats([x.get(k) for x in recs])
        e["delta_test_acc"] = stats([x["test_acc"] - r["start"]["test_acc"] for x, r in zip(recs, runs)])
        ts = {}
        for k in recs[0]["time_per_step_ms"]:
            ts[k] = stats([x["time_per_step_ms"].get(k) for x in recs])["mean"]
        e["time_per_step_ms"] = ts
        e["to_mezo_peak"] = to_peak(recs, peaks)
        n_pts = min(len(x["curve"]) for x in recs)
        e["curve"] = {"queries": [recs[0]["curve"][i]["queries"] for i in range(n_pts)]}
        for k in ("test_acc", "train_loss"):
            st = [stats([x["curve"][i][k] for x in recs]) for i in range(n_pts)]
            e["curve"][k] = [s["mean"] for s in st]
            e["curve"][k + "_std"] = [s["std"] for s in st]
        e["step_losses"] = recs[0]["step_losses"]       # the first seed's, for the faint minibatch line
        out["methods"][m] = e
    return out


def _fmt(x, spec: str, na: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return na
    return format(x, spec)


def _ms(s: dict, spec: str, n: int) -> str:
    """mean, or mean ± std over several seeds."""
    if s is None or s.get("mean") is None:
        return "-"
    if n > 1:
        return f"{format(s['mean'], spec)} ± {format(s['std'], spec)}"
    return format(s["mean"], spec)


def _grid(head: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def accuracy_table(agg: dict) -> str:
    n = agg["n"]
    head = ["method", "queries", "steps", "test acc", "vs start", "best test acc", "train loss",
            "to MeZO peak: queries", "to MeZO peak: train s", "wall s"]
    rows = [["(start)", "0", "0", _ms(agg["start"]["test_acc"], ".3f", n), "", "",
             _ms(agg["start"]["train_loss"], ".4f", n), "", "", ""]]
    for e in agg["methods"].values():
        tp = e.get("to_mezo_peak")
        if tp is None:
            q_txt = s_txt = "-"
        elif tp["reached"] == 0:
            q_txt = s_txt = "not reached"
        else:
            extra = "" if tp["reached"] == tp["of"] else f" ({tp['reached']}/{tp['of']} seeds)"
            q_txt = _ms(tp["queries"], ".0f", tp["reached"]) + extra
            s_txt = _ms(tp["train_s"], ".0f", tp["reached"])
        d = e["delta_test_acc"]
        vs = "-" if d["mean"] is None else (f"{100 * d['mean']:+.1f} pts" +
                                           (f" ± {100 * d['std']:.1f}" if n > 1 else ""))
        rows.append([e["label"] + (" (DIVERGED)" if e["diverged"] else ""), str(e["queries"]), str(e["steps"]),
                     _ms(e["test_acc"], ".3f", n), vs, _ms(e["best_test_acc"], ".3f", n),
                     _ms(e["train_loss"], ".4f", n), q_txt, s_txt, _ms(e["wall_s"], ".0f", n)])
    return _grid(head, rows)


def memory_row(mem: dict) -> dict:
    """A method's memory entry as its table row: on CUDA the allocator's peak, else the process's peak RSS
    (MB, and / the inference process's); x_inference_above_runtime: both above the runtime baseline."""
    cuda = mem.get("cuda_peak_mb") is not None
    return {"peak_mb": mem.get("cuda_peak_mb") if cuda else mem.get("peak_rss_mb"),
            "x_inference": mem.get("cuda_x_inference") if cuda else mem.get("x_inference"),
            "x_inference_above_runtime": mem.get("x_inference_above_runtime")}


def cost_table(agg: dict, memory: Dict[str, dict]) -> str:
    head = ["method", "fwd ms/step", "noise ms/step", "peak MB", "x inf", "x inf-rt"]
    rows: List[List[str]] = []
    for m, e in agg["methods"].items():
        ts = e["time_per_step_ms"]
        mem = memory_row(memory.get(m, {}))
        rows.append([e["label"], _fmt(ts.get("forward"), ".0f"),
                     _fmt(ts.get("noise"), ".0f") if "noise" in ts else
                     ("bwd+upd " + _fmt(ts.get("backward_update"), ".0f")),
                     _fmt(mem["peak_mb"], ".0f"), _fmt(mem["x_inference"], ".2f"),
                     _fmt(mem["x_inference_above_runtime"], ".2f")])
    for k in ("inference", "runtime"):
        mem = memory.get(k)
        if mem and "peak_rss_mb" in mem:
            rows.append([f"({k})", "", "", _fmt(mem.get("cuda_peak_mb", mem.get("peak_rss_mb")), ".0f"),
                         _fmt(mem.get("x_inference", mem.get("cuda_x_inference")), ".2f"),
                         _fmt(mem.get("x_inference_above_runtime"), ".2f")])
    return _grid(head, rows)


def table(agg: dict, memory: Dict[str, dict]) -> str:
    return accuracy_table(agg) + "\n\n" + cost_table(agg, memory)


def _smooth(xs, ys, window: int):
    out_x, out_y = [], []
    for i in range(len(ys)):
        lo = max(0, i - window + 1)
        out_x.append(xs[i])
        out_y.append(sum(ys[lo:i + 1]) / (i + 1 - lo))
    return out_x, out_y


def plot(agg: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = agg["methods"]
    zo = [m for m, e in methods.items() if e["kind"] == "zo"]
    zoom = bool(zo) and len(zo) < len(methods)  # a ZO-only panel when FO lines squash the ZO ones
    n = 3 if zoom else 2
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.6))
    ax1, ax2 = axes[0], axes[-1]
    band = agg["n"] > 1

    def line(ax, e, key, c, label):
        x, y, s = e["curve"]["queries"], e["curve"][key], e["curve"][key + "_std"]
        ax.plot(x, y, "o-", color=c, label=label, ms=4)
        if band:
            ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], color=c, alpha=0.18,
                            lw=0)

    for m, e in methods.items():
        c = _color(m)
        label = e["label"]
        steps = [s for s in e["step_losses"] if not s[2]]
        if steps and not band:
            xs, ys = _smooth([s[0] for s in steps], [s[1] for s in steps], 20)
            ax1.plot(xs, ys, color=c, alpha=0.25, lw=1)
        line(ax1, e, "train_loss", c, label)
        if zoom and m in zo:
            line(axes[1], e, "train_loss", c, label)
        line(ax2, e, "test_acc", c, label)
    if agg["mezo_peak"]["mean"] is not None:
        ax2.axhline(agg["mezo_peak"]["mean"], color="gray", ls=":", lw=1, label="MeZO peak")
    ax2.axhline(agg["start"]["test_acc"]["mean"], color="k", ls="--", lw=0.8, alpha=0.5, label="start")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss (markers: eval points, --eval-train examples" + ("; band: ± std over seeds)" if band else
                                                               "; faint: minibatch, mean of 20 steps)"), fontsize=9)
    if zoom:
        axes[1].set_ylabel("training loss (eval points)")
        axes[1].set_title("training loss, ZO methods only (zoom)", fontsize=9)
    ax2.set_ylabel("test accuracy")
    ax2.set_title("test accuracy" + (" (mean ± std over seeds)" if band else ""), fontsize=9)
    for ax in axes:
        ax.set_xlabel("queries (forward passes of one example)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=9)  # one line of 200+ characters is cut off
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=100)         # a temporary file renamed over `path`
    finally:
        plt.close(fig)
