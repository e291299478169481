"""Merge zo-finetune runs that differ only in their seeds into one mean ± std table and plot.

    python scripts/merge_seeds.py runs/finetune runs/seeds12 --out runs/seeds012

Each argument is a directory with a results.json.  The runs must agree on every setting except
--seed/--seeds/--out (and progress/checkpoint flags); seeds must not repeat.  Writes results.json
(runs, summary, table; memory from the first directory that has it) and curves.png to --out, as
`zo-finetune --seeds` would for the same seeds, since every seed's run is deterministic and
independent of the others.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# settings that may differ between the merged runs
_FREE = {"seed", "seeds", "out", "no_progress", "checkpoint_every", "resume", "argv", "no_memory",
         "memory_steps", "save_weights"}


def _load(d: str) -> dict:
    p = os.path.join(d, "results.json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"merge_seeds: cannot read {p}: {e}") from None


def merge(results: list) -> dict:
    from zo_kernels.finetune import report

    base = {k: v for k, v in results[0]["config"].items() if k not in _FREE}
    for r in results[1:]:
        cfg = {k: v for k, v in r["config"].items() if k not in _FREE}
        diff = sorted(k for k in set(base) | set(cfg) if base.get(k) != cfg.get(k))
        if diff:
            raise SystemExit(f"merge_seeds: the runs differ in {', '.join(diff)}; only seeds may differ")
    runs = [run for r in results for run in r["runs"]]
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"merge_seeds: a seed appears twice: {seeds}")
    runs.sort(key=lambda run: run["seed"])
    memory = next((r["memory"] for r in results if r.get("memory")), {})
    agg = report.aggregate(runs)
    return {"config": {**results[0]["config"], "seeds": [run["seed"] for run in runs]}, "machine": results[0]["machine"],
            "runs": runs, "summary": agg, "memory": memory, "table": report.table(agg, memory),
            "merged_from": [r["config"].get("out") for r in results]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = merge([_load(d) for d in a.dirs])
    from zo_kernels.finetune import FinetuneError, files, report

    try:        # each file whole or not at all (a temporary file renamed), as zo-finetune writes them
        files.check_writable(a.out)
        files.write_json(os.path.join(a.out, "results.json"), out)
        report.plot(out["summary"], os.path.join(a.out, "curves.png"),
                    report.plot_title(out["config"], out["machine"]))
    except FinetuneError as e:
        raise SystemExit(f"merge_seeds: {e}") from None
    print(out["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
