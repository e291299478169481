"""MeZO-SVRG in its paper's setting (issue 25, item 2): Gautam et al. (ICML 2024) fine-tune without a
prompt -- a fresh classifier head -- on 512 training examples, with full-batch anchors over all 512,
q = 2, batch 64, eta1 = 1e-4 and eta2 = 1e-5 or 1e-6, for 25.6M queries; they claim MeZO-SVRG beats MeZO
by up to 20 test points and passes MeZO's peak in half the compute, and (Appendix E.4) that it stays
stable at small batches where MeZO diverges.

Here: the same setting on the main job's model and data, at the query budget of one documented run of at
most two hours on this machine (--queries), each method tuned on validation over its grid:
- MeZO over lr 2e-3 x (0.25, 0.5, 1, 2) -- 2e-3 is the rate tuned for this head and batch earlier
  (docs/finetune.md, "Earlier default");
- MeZO-SVRG over the paper's two pairs (eta1, eta2) = (1e-4, 1e-6), (1e-4, 1e-5) and the second scaled
  by 10 and 100, (1e-3, 1e-4), (1e-2, 1e-3): the paper's rates are for 25.6M queries, and a budget a
  thousand times smaller may want larger steps.  A point's factor is its eta2 over the paper's 1e-5.
Then 3 seeds at each chosen rate, and the batch-size rows: both methods at their chosen rates at batch
8, 16, 32 (64 is the main row), seed 0.  The runs are the ranking's (runner.py): resumable, `lanes` at
a time, one directory each: OUT/paper/<method>/lr<rate>/seed<S> and OUT/batch<B>/<method>/lr<rate>/seed0.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from .plan import Grid, Plan

PAPER_ARGS = ("--head", "fresh", "--n-train", "512", "--large-batch", "512", "--q", "2")
BATCH = 64
BATCHES = (8, 16, 32)
METHODS = ("mezo", "mezo-svrg")
PAPER_ETA2 = 1e-5
GRIDS = {
    "mezo": Grid.scaled((("lr_mezo", 2e-3),), (0.25, 0.5, 1.0, 2.0), ("lr_mezo",)),
    "mezo-svrg": Grid(tuple((eta2 / PAPER_ETA2, (("lr_svrg", eta2), ("lr_svrg_full", eta1)))
                            for eta1, eta2 in ((1e-4, 1e-6), (1e-4, 1e-5), (1e-3, 1e-4), (1e-2, 1e-3)))),
}
PAPER_PAIRS = ((1e-4, 1e-5), (1e-4, 1e-6))       # (eta1, eta2) as the paper gives them


def paper_plan(out: str, extra: Sequence[str] = (), lanes: int = 1, checkpoint_every: int = 200,
               batch: int = BATCH, grids: Optional[Dict[str, Grid]] = None) -> Plan:
    """The paper-setting runs at batch 64: each method's grid at seed 0, then 3 seeds at its chosen rate."""
    grids = GRIDS if grids is None else grids
    return Plan(os.path.join(out, "paper"), list(METHODS), grids["mezo"].factors,
                [*PAPER_ARGS, "--batch-size", str(batch), *extra], lanes=lanes, checkpoint_every=checkpoint_every,
                min_grid=1, grids=grids)


def batch_plan(out: str, batch: int, chosen: Dict[str, Grid], extra: Sequence[str] = (), lanes: int = 1,
               checkpoint_every: int = 200) -> Plan:
    """Both methods at batch `batch` with the rates chosen at batch 64 (`chosen`: one-point grids), seed 0."""
    return Plan(os.path.join(out, f"batch{batch}"), list(METHODS), (1.0,),
                [*PAPER_ARGS, "--batch-size", str(batch), *extra], lanes=lanes, checkpoint_every=checkpoint_every,
                min_grid=1, grids=chosen, seeds=(0,))


def chosen_grids(ranking: dict, plan: Plan) -> Optional[Dict[str, Grid]]:
    """One-point grids at the rates `plan`'s ranking chose (None until both methods are ranked)."""
    if not all(m in ranking["methods"] for m in METHODS):
        return None
    return {m: Grid(((1.0, plan.rates(m, ranking["methods"][m]["chosen"]["factor"])),)) for m in METHODS}


def batch_rows(results: Dict[int, dict], prefixes: Dict[int, str]) -> List[dict]:
    """One row per (batch, method) from each batch's collect() (`prefixes`: its directory under OUT): seed 0's
    final test and validation accuracy, train loss, diverged, steps, queries and training seconds."""
    rows = []
    for b, r in sorted(results.items()):
        for m in METHODS:
            e = r["methods"].get(m)
            s = next((x for x in e["seeds"] if x["seed"] == 0), None) if e else None
            rows.append({"batch": b, "method": m, "rates": e["chosen"]["rates"] if e else None,
                         **{k: (s[k] if s else None) for k in ("test_acc", "val_acc", "train_loss", "diverged",
                                                                "steps", "queries", "train_s", "start_test_acc")},
                         "dir": os.path.join(prefixes[b], s["dir"]) if s else None})
    return rows


def batch_markdown(rows: List[dict]) -> str:
    head = ["batch", "method", "rates", "test acc", "val acc", "train loss", "steps", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if j else "---" for j in range(len(head))) + "|"]
    for r in rows:
        if r["test_acc"] is None:
            lines.append(f"| {r['batch']} | {r['method']} | (not run yet) |" + " |" * (len(head) - 3))
            continue
        rates = ", ".join(f"{k} {v:.3g}" for k, v in r["rates"].items())
        lines.append(f"| {r['batch']} | {r['method']} | {rates} | {r['test_acc']:.3f} | {r['val_acc']:.3f} | "
                     f"{r['train_loss']:.4f} | {r['steps']} | {'yes' if r['diverged'] else 'no'} |")
    return "\n".join(lines) + "\n"


GRIDS_TEXT = ("its grid (MeZO: lr 2e-3 x 0.25, 0.5, 1, 2; MeZO-SVRG: (eta1, eta2) = (1e-4, 1e-6), (1e-4, 1e-5) -- the "
              "paper's pairs -- and (1e-3, 1e-4), (1e-2, 1e-3))")


def run(out: str, extra: Sequence[str], lanes: int, checkpoint_every: int, runner=None, collect_only: bool = False,
        into: Optional[str] = None, say=print, batch: int = BATCH, batches: Sequence[int] = BATCHES,
        grids: Optional[Dict[str, Grid]] = None) -> dict:
    """Every run of the study (skipping the finished ones), then OUT/svrg_paper.json, .md and .png; with `into`, the
    ranking.json whose reserved keys "svrg_paper_setting" and "batch_sizes" receive them.  `batch`, `batches`
    and `grids` change the study's shape (the tests' tiny model)."""
    from .. import files
    from .collect import RESERVED, collect, put_reserved, read
    from .plot import plot
    from .runner import execute
    from .table import markdown

    if into is not None:
        read(into, "--into")            # before any run: a typo must not cost the study
    plan = paper_plan(out, extra, lanes, checkpoint_every, batch, grids)
    errors = {} if collect_only else execute(plan, runner, say=say)
    paper = {k: v for k, v in collect(plan, errors).items() if k not in RESERVED}   # no study inside the study
    chosen = chosen_grids(paper, plan)
    results, prefixes = {batch: paper}, {batch: "paper"}
    for b in batches if chosen else ():
        bp = batch_plan(out, b, chosen, extra, lanes, checkpoint_every)
        results[b] = collect(bp, {} if collect_only else execute(bp, runner, say=say))
        prefixes[b] = f"batch{b}"
    study = {"version": 1, "setting": {"paper_args": list(PAPER_ARGS), "batch": batch, "batches": sorted({*batches, batch}),
                                       "paper_pairs": [{"eta1": a, "eta2": b} for a, b in PAPER_PAIRS],
                                       "zo_finetune_args": list(extra), "queries": plan.queries},
             "svrg_paper_setting": paper, "batch_sizes": {"lm": batch_rows(results, prefixes)}}
    files.write_json(os.path.join(out, "svrg_paper.json"), study)
    text = (markdown(paper, GRIDS_TEXT) + "\nBatch sizes (seed 0, the rates chosen at batch 64):\n\n"
            + batch_markdown(study["batch_sizes"]["lm"]))
    files.write_bytes(os.path.join(out, "svrg_paper.md"), text.encode())
    if paper["methods"]:
        plot(paper, os.path.join(out, "svrg_paper.png"))
    if into is not None:
        put_reserved(into, "--into", svrg_paper_setting={"setting": study["setting"], **paper},
                     batch_sizes={"lm": study["batch_sizes"]["lm"]})
    say(text)
    return study
