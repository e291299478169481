"""Merge zo-finetune runs that differ only in their seeds into one mean ± std table and plot.

    python scripts/merge_seeds.py runs/finetune runs/seeds12 --out runs/seeds012

Each argument is a directory with a results.json.  The runs must agree on every setting except
--seed/--seeds/--out (and progress/checkpoint flags); seeds must not repeat.  Writes results.json
(runs, summary, table; memory from the first directory that has it) and curves.png to --out, as
`zo-finetune --seeds` would for the same seeds, since every seed's run is deterministic and
independent of the others.  The merge itself: zo_kernels.finetune.merge (the ranking harness uses it too).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from zo_kernels.finetune import FinetuneError, files, merge, report

    try:        # each file whole or not at all (a temporary file renamed), as zo-finetune writes them
        out = merge.merge([merge.load(d) for d in a.dirs])
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
