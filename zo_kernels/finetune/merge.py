"""Merge zo-finetune runs that differ only in their seeds (scripts/merge_seeds.py, the ranking harness).

Each run is a results.json.  The runs must agree on every setting except --seed/--seeds/--out (and
progress/checkpoint/memory flags); seeds must not repeat.  The merge is what `zo-finetune --seeds`
gives for the same seeds, since every seed's run is deterministic and independent of the others.
"""
from __future__ import annotations

import json
import os

from . import report
from .errors import FinetuneError

# settings that may differ between the merged runs
FREE = {"seed", "seeds", "out", "no_progress", "checkpoint_every", "resume", "argv", "no_memory",
        "memory_steps", "save_weights"}


def load(d: str) -> dict:
    """DIR/results.json (one FinetuneError line when it cannot be read)."""
    p = os.path.join(d, "results.json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FinetuneError(f"cannot read {p}: {e}") from None


def merge(results: list) -> dict:
    """One results.json (runs, summary, table; memory from the first run that has it) from single- or
    several-seed results.json dicts with equal settings."""
    base = {k: v for k, v in results[0]["config"].items() if k not in FREE}
    for r in results[1:]:
        cfg = {k: v for k, v in r["config"].items() if k not in FREE}
        diff = sorted(k for k in set(base) | set(cfg) if base.get(k) != cfg.get(k))
        if diff:
            raise FinetuneError(f"the runs differ in {', '.join(diff)}; only seeds may differ")
    runs = [run for r in results for run in r["runs"]]
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise FinetuneError(f"a seed appears twice: {seeds}")
    runs.sort(key=lambda run: run["seed"])
    memory = next((r["memory"] for r in results if r.get("memory")), {})
    agg = report.aggregate(runs)
    return {"config": {**results[0]["config"], "seeds": [run["seed"] for run in runs]}, "machine": results[0]["machine"],
            "runs": runs, "summary": agg, "memory": memory, "table": report.table(agg, memory),
            "merged_from": [r["config"].get("out") for r in results]}
