"""rank: which ZO method should a user pick?  Every method tuned over a learning-rate grid on the
validation split, then three seeds at its best rate (issue 25; docs/ranking.md).

    python scripts/rank.py --out runs/ranking                   # every ZO method + fo-sgd, fo-adam
    python scripts/rank.py --out runs/ranking --lanes 2         # two 1-thread runs at a time
    python scripts/rank.py --methods mezo,lozo --grid 0.25,0.5,1,2,4 --queries 9600   # others go to zo-finetune
    python scripts/rank.py --out runs/ranking --collect         # ranking.json / .md from the finished runs
    python scripts/rank.py --out runs/ranking --carry docs/ranking.json   # the methods ranked there: not rerun
    python scripts/rank.py --markdown runs/ranking/ranking.json # the table, from ranking.json alone

Each (method, rate, seed) is one `zo-finetune` run in OUT/<method>/lr<rate>/seed<S>; a rerun skips the
finished ones and resumes the killed ones.  Writes OUT/ranking.json, OUT/ranking.md and OUT/ranking.png.
Bad input: one line on stderr, exit 2; runs that failed: listed, exit 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ..errors import FinetuneError
from .plan import DEFAULT_FACTORS, MIN_GRID, Plan, default_methods


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"rank: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rank", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                epilog="Any other argument is passed to every zo-finetune run (e.g. --queries, --threads).")
    p.add_argument("--out", default="runs/ranking", help="the runs' directories, ranking.json and ranking.md")
    p.add_argument("--methods", default=None, help="comma list (default: every ZO method, then fo-sgd, fo-adam)")
    p.add_argument("--grid", default=",".join(f"{f:g}" for f in DEFAULT_FACTORS),
                   help="factors of each method's default learning rate")
    p.add_argument("--lanes", type=int, default=1,
                   help="runs at a time, each with --threads 1 (timings are then per 1-thread process)")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="N",
                   help="each run's zo-finetune --checkpoint-every: a killed run resumes from its last checkpoint")
    p.add_argument("--collect", action="store_true", help="start no run: write ranking.json/.md from those finished")
    p.add_argument("--carry", default=None, metavar="RANKING_JSON",
                   help="take the methods this earlier ranking.json (same settings) ranks as they stand there: "
                        "their runs are not made again")
    p.add_argument("--markdown", default=None, metavar="RANKING_JSON", help="print the table of a ranking.json")
    p.add_argument("--svrg-paper", action="store_true",
                   help="instead of the ranking: MeZO and MeZO-SVRG in the MeZO-SVRG paper's setting, tuned, 3 seeds, "
                        "then batch 8/16/32 (svrg_paper.py; writes OUT/svrg_paper.json and .md)")
    p.add_argument("--into", default=None, metavar="RANKING_JSON",
                   help="--svrg-paper: also put its results under this ranking.json's svrg_paper_setting / batch_sizes")
    p.add_argument("--allow-short-grid", action="store_true",
                   help=f"accept fewer than {MIN_GRID} grid factors (tests and smoke runs only)")
    return p


def _floats(text: str, what: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FinetuneError(f"{what} {text}: expected a comma list of numbers such as 0.25,0.5,1,2") from None


def _svrg_paper(a, extra: List[str], runner) -> int:
    from .. import files
    from .svrg_paper import run

    if a.methods is not None or a.grid != build_parser().get_default("grid") or a.markdown is not None:
        raise FinetuneError("--svrg-paper has its own methods and rates: do not pass --methods, --grid or --markdown")
    lock = files.open_run_dir(a.out)
    try:
        study = run(a.out, extra, a.lanes, a.checkpoint_every, runner, collect_only=a.collect, into=a.into,
                    say=lambda s: print(s, flush=True))
    finally:
        lock.release()
    missing = study["svrg_paper_setting"]["incomplete"]
    return 1 if missing or any(r["test_acc"] is None for r in study["batch_sizes"]["lm"]) else 0


def main(argv: Optional[List[str]] = None, runner=None) -> int:
    """`runner(zo_finetune_argv, log_path) -> exit code` runs one zo-finetune (default: a child process)."""
    from .. import files
    from .collect import carried, collect, read, write
    from .plot import plot
    from .runner import execute
    from .table import markdown

    a, extra = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.markdown is not None:
            ranking = read(a.markdown, "--markdown")
            try:
                print(markdown(ranking), end="")
            except (KeyError, TypeError) as e:
                raise FinetuneError(f"--markdown {a.markdown}: not a readable ranking.json (no key {e})") from None
            return 0
        if a.svrg_paper:
            return _svrg_paper(a, extra, runner)
        if a.into is not None:
            raise FinetuneError("--into goes with --svrg-paper")
        methods = default_methods() if a.methods is None else [m.strip() for m in a.methods.split(",") if m.strip()]
        plan = Plan(a.out, methods, _floats(a.grid, "--grid"), extra, lanes=a.lanes,
                    checkpoint_every=a.checkpoint_every, min_grid=1 if a.allow_short_grid else MIN_GRID)
        carry = carried(plan, a.carry) if a.carry is not None else None
        todo = plan.without(carry.methods) if carry else plan
        lock = files.open_run_dir(a.out)
        try:
            print(f"rank: {len(todo.methods)} methods x {len(plan.factors)} rates, then {len(plan.seeds) - 1} more seeds each: "
                  f"{todo.n_runs()} zo-finetune runs in {a.out}, {plan.lanes} at a time"
                  + (f"; carried from {a.carry}: {', '.join(carry.methods)}" if carry and carry.methods else ""),
                  flush=True)
            errors = {} if a.collect else execute(todo, runner, say=lambda s: print(s, flush=True))
            ranking = collect(plan, errors, carry)
            write(os.path.join(a.out, "ranking.json"), ranking)
            files.write_bytes(os.path.join(a.out, "ranking.md"), markdown(ranking).encode())
            if ranking["methods"]:
                plot(ranking, os.path.join(a.out, "ranking.png"))
        finally:
            lock.release()
    except FinetuneError as e:
        print(f"rank: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rank: interrupted (rerun the same command to continue)", file=sys.stderr)
        return 130
    print(markdown(ranking), end="")
    for m, lines in ranking["incomplete"].items():
        print(f"rank: {m} not ranked: {lines[0]}" + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""),
              file=sys.stderr)
    return 1 if ranking["incomplete"] else 0
