"""ranking.json: the numbers behind the ranking, built from the runs' results.json files alone.

Top level: "settings" (grid factors, seeds, the pass-through zo-finetune arguments, queries, lanes,
threads per run), "machine" (the first run's), "methods", "order" (the ranked methods by mean test
accuracy, best first), "incomplete" (method -> why it has no entry yet), "tuning" (per unranked method its
grid runs finished so far -- the rows of "grid" below -- and, once all are, "chosen" and "seeds_finished"),
and two keys reserved for the MeZO-SVRG paper-setting runs (issue 25, item 2), null until those runs fill
them: "svrg_paper_setting" and "batch_sizes" (the batch-size robustness rows); a rewrite of ranking.json
keeps what they hold.

Per method, keyed by its `zo-finetune --methods` name:
- "name", "label", "kind" (zo / fo); "tuned": {flag: the rate zo-finetune uses by default} for every rate the
  grid scales (the learning rate first), "lr_flag" its flag, "default_lr" its default;
- "grid": one row per rate tried at the tuning seed: factor, lr, rates {flag: value}, val_acc, train_loss,
  diverged, dir (test accuracy is left out: it never chooses);
- "chosen": factor, lr, rates, at_grid_edge (the best rate is the grid's lowest or highest: widen it);
- "seeds": per seed at the chosen rate: test_acc, val_acc, train_loss, queries, steps, train_s (training
  seconds, evaluation excluded), wall_s, start_test_acc, diverged, mezo_peak, to_mezo_peak ({queries,
  train_s}, null: not reached), the eval curve [{queries, train_s, test_acc, train_loss}] (for equal-time
  comparisons) and dir;
- "summary": the seeds merged by zo_kernels.finetune.merge (what scripts/merge_seeds.py writes): test_acc,
  val_acc, train_loss, delta_test_acc (vs the start), train_s, wall_s as {mean, std (sample), values};
  queries, steps, diverged (runs); to_mezo_peak {reached, of, queries, train_s} or null; memory {peak_mb,
  x_inference, x_inference_above_runtime} from the MEMORY_SEED run, or null when not measured; equal_time
  {train_s, test_acc, train_loss, queries}: at settings.equal_time_s, the shortest training time of any
  ranked run, each seed's last eval point within it (eval points are --evals apart, so this is coarse).

Carried methods (`rank --carry EARLIER_RANKING_JSON`): a method that an earlier ranking.json of the same
settings ranked is taken from it as it stands there -- its runs are not made again, its entry gains
"carried_from" -- and settings["carried"] says from where and on which machine; its reserved keys come
along.  MeZO's peaks and the equal-time budget are recomputed over carried and new entries alike (their
seed rows keep the curves).
This is how a ranking longer than one machine's lifetime goes on: ranking.json is the durable record.

MeZO's peak is defined per seed, as zo-finetune defines it within one run (zo_kernels.finetune.report):
the best test accuracy over the eval points after the start of MeZO's run at its chosen rate and that
seed.  The seeds fix the data split and the start, so a method's seed-s run is measured against MeZO's
seed-s peak: the queries and training seconds of its first eval point at or above it.  Null when MeZO is
not ranked.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from .. import files, merge, report
from ..errors import FinetuneError
from ..registry import METHODS
from .choice import choose, grid_records, record
from .plan import MEMORY_SEED, TUNE_SEED, Plan, flag

VERSION = 1
RESERVED = ("svrg_paper_setting", "batch_sizes")
_SUMMARY = ("test_acc", "val_acc", "train_loss", "delta_test_acc", "train_s", "wall_s", "queries", "steps",
            "diverged")


# the settings an earlier ranking must share for its entries to be carried into this one
CARRY_SETTINGS = ("zo_finetune_args", "grid_factors", "seeds", "tune_seed", "memory_seed", "queries", "n_val",
                  "n_test", "evals", "lanes")


@dataclass(frozen=True)
class Carry:
    """The entries taken from an earlier ranking.json, with where they came from."""
    source: str
    machine: Optional[dict]
    threads: Optional[int]
    methods: Dict[str, dict]
    reserved: Dict[str, object]         # its RESERVED keys: the paper-setting study's results go on with it


def _rates(rates) -> dict:
    return {flag(k): v for k, v in rates}


def _seed_row(plan: Plan, run, res: dict) -> dict:
    rec = res["methods"][run.method]
    return {"seed": run.seed, "dir": os.path.relpath(run.dir, plan.out), "test_acc": rec["test_acc"],
            "val_acc": rec["val_acc"], "train_loss": rec["train_loss"], "queries": rec["queries"],
            "steps": rec["steps"], "train_s": rec["train_s"], "wall_s": rec["wall_s"],
            "start_test_acc": res["start"]["test_acc"], "diverged": rec["diverged"], "mezo_peak": None,
            "to_mezo_peak": None,
            "curve": [{k: p[k] for k in ("queries", "train_s", "test_acc", "train_loss")} for p in rec["curve"]]}


def _grid_row(plan: Plan, r, rec: dict) -> dict:
    return {"factor": r.factor, "lr": r.lr, "rates": _rates(r.rates), "val_acc": rec["val_acc"],
            "train_loss": rec["train_loss"], "diverged": rec["diverged"], "dir": os.path.relpath(r.dir, plan.out)}


def _chosen(plan: Plan, best) -> dict:
    return {"factor": best.factor, "lr": best.lr, "rates": _rates(best.rates),
            "at_grid_edge": best.factor in plan.grids[best.method].edges}


def tuning_entry(plan: Plan, m: str) -> Optional[dict]:
    """An unranked method's tuning so far: its finished grid runs and, once all are, the chosen rate (None
    when no grid run has finished)."""
    done = [r for r in plan.grid(m) if os.path.exists(os.path.join(r.dir, "results.json"))]
    if not done:
        return None
    grid = [(r, record(r)) for r in done]
    best = choose(grid) if len(done) == len(plan.grids[m].factors) else None
    return {"grid": [_grid_row(plan, r, rec) for r, rec in grid], "chosen": best and _chosen(plan, best),
            "seeds_finished": best and sum(os.path.exists(os.path.join(r.dir, "results.json"))
                                           for r in plan.seed_runs(m, best.factor)) or 0}


def _finished(runs) -> None:
    for r in runs:
        if not os.path.exists(os.path.join(r.dir, "results.json")):
            raise FinetuneError(f"{r.dir} has no results.json yet")


def method_entry(plan: Plan, m: str) -> dict:
    """One method's entry (FinetuneError when a run of it has no results.json yet)."""
    _finished(plan.grid(m))
    grid = grid_records(plan, m)
    best = choose(grid)
    runs = plan.seed_runs(m, best.factor)
    _finished(runs)
    results = [merge.load(r.dir) for r in runs]
    merged = merge.merge(results)
    s = merged["summary"]["methods"][m]
    mem = merged["memory"].get(m)
    knobs = dict(plan.grids[m].base)
    lr_knob = next(iter(knobs))
    return {"name": m, "label": METHODS[m].label, "kind": METHODS[m].kind, "tuned": _rates(knobs.items()),
            "lr_flag": flag(lr_knob), "default_lr": knobs[lr_knob],
            "grid": [_grid_row(plan, r, rec) for r, rec in grid], "chosen": _chosen(plan, best),
            "seeds": [_seed_row(plan, r, res) for r, res in zip(runs, results)],
            "summary": {**{k: s[k] for k in _SUMMARY}, "to_mezo_peak": None,
                        "memory": report.memory_row(mem) if mem else None},
            "_records": [res["methods"][m] for res in results]}


def _with_mezo_peaks(methods: Dict[str, dict]) -> None:
    mezo = methods.get("mezo")
    if mezo is None:
        return
    peaks = [report.peak(rec) for rec in mezo["_records"]]
    for e in methods.values():
        for row, rec, pk in zip(e["seeds"], e["_records"], peaks):
            hit = None if pk is None else report.reach(rec["curve"], pk)
            row["mezo_peak"] = pk
            row["to_mezo_peak"] = None if hit is None else {"queries": hit["queries"], "train_s": hit["train_s"]}
        e["summary"]["to_mezo_peak"] = report.to_peak(e["_records"], peaks)


def at_time(curve: List[dict], seconds: float) -> dict:
    """The last eval point of `curve` whose training seconds are at most `seconds` (the start, 0 s, at least)."""
    return [p for p in curve if p["train_s"] <= seconds + 1e-9][-1]


def _with_equal_time(methods: Dict[str, dict]) -> Optional[float]:
    """Equal training time: T = the shortest training time of any ranked run; per method the test accuracy and
    train loss at its last eval point within T, per seed and as mean ± std (summary "equal_time")."""
    if not methods:
        return None
    budget = min(s["train_s"] for e in methods.values() for s in e["seeds"])
    for e in methods.values():
        pts = [at_time(s["curve"], budget) for s in e["seeds"]]
        e["summary"]["equal_time"] = {"train_s": budget, "test_acc": report.stats([p["test_acc"] for p in pts]),
                                      "train_loss": report.stats([p["train_loss"] for p in pts]),
                                      "queries": report.stats([p["queries"] for p in pts])}
    return budget


def _settings(plan: Plan) -> dict:
    """The settings that fix what a ranking's runs measure (CARRY_SETTINGS)."""
    return {"zo_finetune_args": plan.extra, "grid_factors": plan.factors, "seeds": list(plan.seeds),
            "tune_seed": TUNE_SEED, "memory_seed": MEMORY_SEED, "queries": plan.queries, "n_val": plan.args.n_val,
            "n_test": plan.args.n_test, "evals": plan.args.evals, "lanes": plan.lanes}


def carried(plan: Plan, path: str) -> Carry:
    """The methods of `plan` that the ranking.json at `path` ranks, to be taken as they stand there (one
    FinetuneError line when it is unreadable, was made with other settings, or tuned a method over other
    rates)."""
    old = read(path, "--carry")
    try:
        st, entries = old["settings"], old["methods"]
    except KeyError as e:
        raise FinetuneError(f"--carry {path}: not a readable ranking.json (no key {e})") from None
    ours = _settings(plan)
    diff = [k for k in CARRY_SETTINGS if st.get(k) != ours[k]]
    if diff:
        raise FinetuneError(f"--carry {path} was ranked with other settings ({', '.join(diff)}); only a ranking "
                            f"with the same ones can be carried")
    taken = {}
    for m in plan.methods:
        if m not in entries:
            continue
        want = [_rates(plan.rates(m, f)) for f in plan.grids[m].factors]
        if [g["rates"] for g in sorted(entries[m]["grid"], key=lambda g: g["factor"])] != want:
            raise FinetuneError(f"--carry {path}: {m} was tuned over other rates than this ranking's grid")
        taken[m] = {**entries[m], "carried_from": entries[m].get("carried_from", path)}    # the first source
    return Carry(path, old.get("machine"), st.get("threads_per_run"), taken, {k: old.get(k) for k in RESERVED})


def collect(plan: Plan, errors: Optional[Dict[str, List[str]]] = None, carry: Optional[Carry] = None) -> dict:
    """ranking.json's content for `plan` from its run directories and the `carry`ied entries; `errors`:
    execute()'s error lines."""
    errors = errors or {}
    methods, incomplete, tuning, first = {}, {}, {}, None
    for m in plan.methods:
        if carry and m in carry.methods:
            e = carry.methods[m]
            methods[m] = {**e, "_records": [{"curve": s["curve"]} for s in e["seeds"]]}
            continue
        if errors.get(m):
            incomplete[m] = errors[m]
        else:
            try:
                methods[m] = method_entry(plan, m)
            except FinetuneError as e:
                incomplete[m] = [str(e)]
        if m not in methods:
            t = tuning_entry(plan, m)
            if t is not None:
                tuning[m] = t
        if first is None and (m in methods or m in tuning):
            row = (methods[m]["grid"] if m in methods else tuning[m]["grid"])[0]
            first = merge.load(os.path.join(plan.out, row["dir"]))
    _with_mezo_peaks(methods)
    equal_time = _with_equal_time(methods)
    for e in methods.values():
        del e["_records"]
    order = sorted(methods, key=lambda m: -methods[m]["summary"]["test_acc"]["mean"])
    threads = first["config"].get("threads") if first else carry and carry.threads
    taken = sorted(m for m in methods if "carried_from" in methods[m])
    return {"version": VERSION,
            "settings": {**_settings(plan), "threads_per_run": threads, "checkpoint_every": plan.checkpoint_every,
                         "equal_time_s": equal_time,
                         "timing": "no run finished yet" if threads is None else
                                   f"train_s of one zo-finetune process with {threads} thread(s)"
                                   + (f", {plan.lanes} processes side by side" if plan.lanes > 1 else ""),
                         "carried": {"from": carry.source, "methods": taken, "machine": carry.machine}
                                    if taken else None},
            "machine": first["machine"] if first else carry and carry.machine, "methods": methods, "order": order,
            "incomplete": incomplete, "tuning": tuning, **{k: carry.reserved.get(k) if carry else None for k in RESERVED}}


def read(path: str, what: str) -> dict:
    """The JSON object at `path` (one FinetuneError line naming the option `what` when it is not one)."""
    try:
        with open(path) as f:
            ranking = json.load(f)
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{what} {path}: not a readable ranking.json ({e})") from None
    if not isinstance(ranking, dict):
        raise FinetuneError(f"{what} {path}: not a readable ranking.json (not a JSON object)")
    return ranking


def _over(older: dict, newer: dict) -> dict:
    """The RESERVED keys of `newer` laid over those of `older`: a non-null svrg_paper_setting replaces the
    older one, batch_sizes join study by study (the newer study wins)."""
    out = {}
    for k in RESERVED:
        was, new = older.get(k), newer.get(k)
        if k == "batch_sizes" and isinstance(was, dict) and isinstance(new, dict):
            out[k] = {**was, **new}
        else:
            out[k] = was if new is None else new
    return out


def put_reserved(path: str, what: str, svrg_paper_setting: Optional[dict] = None,
                 batch_sizes: Optional[Dict[str, object]] = None) -> None:
    """Fill the RESERVED keys of the ranking.json at `path`, everything else kept, atomically:
    `svrg_paper_setting` replaces that key, `batch_sizes` ({study: its rows}) joins the studies there."""
    ranking = read(path, what)
    ranking.update(_over(ranking, {"svrg_paper_setting": svrg_paper_setting, "batch_sizes": batch_sizes}))
    files.write_json(path, ranking)


def write(path: str, ranking: dict) -> None:
    """Atomically (temporary file + rename).  What the ranking.json already at `path` holds under RESERVED is
    kept -- it is newer than anything carried: svrg_paper_setting as it is there, batch_sizes study by study
    over the carried ones."""
    try:
        there = read(path, "ranking.json")
    except FinetuneError:
        there = {}
    ranking.update(_over(ranking, there))
    files.write_json(path, ranking)
