"""The ranking's Markdown fragment (for docs/ranking.md), from ranking.json alone.

An equal-queries table, sorted by mean test accuracy (best first), then a verdict over the ZO methods
(the first-order rows are the upper reference, not candidates): the best ZO method is named the winner
when no other ZO method is within one standard deviation of it -- mean_best - mean_other > max(std_best,
std_other) for every other -- else the methods within that distance are named and the difference is said
to be inside the seed-to-seed noise.
"""
from __future__ import annotations

from typing import List, Optional


def _pm(s: dict, spec: str, scale: float = 1.0) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{format(scale * s['mean'], spec)} ± {format(scale * s['std'], spec.lstrip('+'))}"


def _to_peak(tp: Optional[dict]) -> str:
    if tp is None:
        return "-"
    if tp["reached"] == 0:
        return f"not reached (0/{tp['of']})"
    return f"{tp['queries']['mean']:,.0f} / {tp['train_s']['mean']:.0f} s ({tp['reached']}/{tp['of']})"


def _memory(mem: Optional[dict]) -> str:
    if not mem or mem.get("peak_mb") is None:
        return "-"
    x = mem.get("x_inference")
    return f"{mem['peak_mb']:.0f}" + ("" if x is None else f" ({x:.2f}x)")


def _within(best: dict, other: dict) -> bool:
    a, b = best["summary"]["test_acc"], other["summary"]["test_acc"]
    return a["mean"] - b["mean"] <= max(a["std"], b["std"])


def verdict(ranking: dict) -> str:
    """The line naming the winner among the ZO methods, or the methods tied with the best within one std."""
    zo = [ranking["methods"][m] for m in ranking["order"] if ranking["methods"][m]["kind"] == "zo"]
    if not zo:
        return "No ZO method is ranked yet."
    best, rest = zo[0], zo[1:]
    acc = lambda e: _pm(e["summary"]["test_acc"], ".3f")  # noqa: E731
    tied = [e for e in rest if _within(best, e)]
    if not rest:
        return f"Only one ZO method is ranked: {best['label']} ({acc(best)})."
    if not tied:
        return (f"**Winner: {best['label']}** (`{best['name']}` at {best['lr_flag']} {best['chosen']['lr']:.3g}), "
                f"test accuracy {acc(best)}: more than one standard deviation above every other ZO method "
                f"(next: {rest[0]['label']}, {acc(rest[0])}).")
    names = ", ".join(f"{e['label']} ({acc(e)})" for e in tied)
    return (f"No winner: {names} {'is' if len(tied) == 1 else 'are'} within one standard deviation of the best "
            f"ZO method, {best['label']} ({acc(best)}); the differences at the top are inside the seed-to-seed noise.")


def markdown(ranking: dict, grids: Optional[str] = None) -> str:
    """The table and verdict; `grids` says how the rates were tuned (default: the ranking's common grid)."""
    st = ranking["settings"]
    grids = grids or f"the rate of its grid (x {', '.join(f'{f:g}' for f in st['grid_factors'])} its default)"
    head = ["#", "method (`--methods`)", "rate", "test acc", "vs start (pts)", "train loss", "queries",
            "train s", "to MeZO's peak: queries / train s", "peak MB (x inf)", "test acc at equal time"]
    rows: List[List[str]] = []
    for i, m in enumerate(ranking["order"], 1):
        e = ranking["methods"][m]
        s, ch = e["summary"], e["chosen"]
        rate = f"{e['lr_flag']} {ch['lr']:.3g}" + (" (grid edge)" if ch["at_grid_edge"] else "")
        rows.append([str(i), f"{e['label']} (`{e['name']}`)" + (" [FO]" if e["kind"] == "fo" else ""), rate,
                     _pm(s["test_acc"], ".3f"), _pm(s["delta_test_acc"], "+.1f", 100), _pm(s["train_loss"], ".4f"),
                     f"{s['queries']:,}", _pm(s["train_s"], ".0f"), _to_peak(s["to_mezo_peak"]), _memory(s["memory"]),
                     _pm((s.get("equal_time") or {}).get("test_acc"), ".3f")])
    lines = [f"Equal queries: {st['queries']:,} per method (first-order rows: the same number of forward examples); "
             f"each method at {grids} with the best validation accuracy on seed {st['tune_seed']}, then seeds "
             f"{', '.join(map(str, st['seeds']))}: mean ± std (sample) of the final test accuracy on {st['n_test']} "
             f"examples. Times: {st['timing']}."
             + (f" Equal time: each seed's last eval point within {st['equal_time_s']:.0f} training seconds, the "
                f"shortest run's ({st.get('evals')} eval points per run after the start: coarse)."
                if st.get("equal_time_s") is not None else ""), "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---:" if j else "---" for j in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if not rows:
        lines[2:] = ["(no method is ranked yet)"]
    lines += ["", verdict(ranking)]
    carried = st.get("carried")
    if carried:
        cpu = ((carried.get("machine") or {}).get("cpu")) or "a machine not recorded"
        lines += ["", f"Carried over from an earlier ranking ({carried['from']}; its runs on {cpu}), not rerun: "
                      + ", ".join(f"`{m}`" for m in carried["methods"]) + "."]
    if ranking.get("incomplete"):
        lines += ["", "Not ranked yet (runs missing or failed): " + ", ".join(sorted(ranking["incomplete"])) + "."]
    if ranking.get("tuning"):
        lines += ["", tuning_markdown(ranking)]
    return "\n".join(lines) + "\n"


def tuning_markdown(ranking: dict) -> str:
    """The unranked methods' tuning so far: each finished grid run's validation accuracy and train loss (test
    accuracy is not shown: it never chooses), the chosen rate once the grid is complete, the seeds finished."""
    n_seeds = len(ranking["settings"]["seeds"])
    lines = [f"Tuning so far (seed {ranking['settings']['tune_seed']}, validation accuracy / train loss per rate; "
             "**bold**: chosen):", "", "| method | rates tried: val acc / train loss | chosen | seeds finished |",
             "|---|---|---|---:|"]
    for m, t in ranking["tuning"].items():
        ch = t["chosen"]
        flag = next(iter(t["grid"][0]["rates"]))
        cells = []
        for g in sorted(t["grid"], key=lambda g: g["lr"]):
            c = f"{g['lr']:.3g}: {g['val_acc']:.3f} / {g['train_loss']:.4f}" + (" (diverged)" if g["diverged"] else "")
            cells.append(f"**{c}**" if ch and ch["lr"] == g["lr"] else c)
        chosen = "grid not finished" if ch is None else f"{flag} {ch['lr']:.3g}" + (" (grid edge)" if ch["at_grid_edge"] else "")
        lines.append(f"| `{m}` | {'; '.join(cells)} | {chosen} | {t['seeds_finished']} / {n_seeds} |")
    return "\n".join(lines)
