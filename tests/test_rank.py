"""The ranking harness (scripts/rank.py, zo_kernels.finetune.ranking): the grid comes from the registry's
default rates, the rate is chosen on validation accuracy (checked against the runs' own results.json),
finished runs are skipped, a deleted one is rerun, a killed one resumes from its checkpoint, the seeds
merge as scripts/merge_seeds.py merges them, and ranking.json / the Markdown table say what they must."""
import json
import shutil
import threading
import time

import pytest

from helpers import load_script
from test_finetune_cli import tiny  # noqa: F401  (the tiny model + data fixture)

torch = pytest.importorskip("torch")

from zo_kernels.finetune.cli import main as zo_finetune  # noqa: E402
from zo_kernels.finetune.ranking import choice, collect, table  # noqa: E402
from zo_kernels.finetune.ranking.cli import main as rank  # noqa: E402
from zo_kernels.finetune.ranking.plan import DEFAULT_FACTORS, Plan, Run, default_methods  # noqa: E402
from zo_kernels.finetune.ranking.runner import SubprocessRunner  # noqa: E402
from zo_kernels.finetune.registry import METHODS  # noqa: E402

# On the tiny model (fresh head, 4 steps) these factors give MeZO two validation accuracies (the higher at the
# higher train loss) and FO-SGD a validation tie (the train loss decides): both halves of the rule are used.
GRID = ["--grid", "100,1000", "--allow-short-grid"]
METHODS_RANKED = ["mezo", "fo-sgd"]


def _extra(tiny):  # noqa: F811
    return ["--model", tiny["model"], "--dataset", tiny["csv"], "--n-train", "32", "--n-val", "16", "--n-test", "16",
            "--batch-size", "4", "--max-length", "16", "--threads", "1", "--steps", "4", "--evals", "2",
            "--no-memory", "--head", "fresh"]


class InProcess:
    """zo-finetune in this process; keeps every call's arguments and, for resume tests, the checkpoints."""

    def __init__(self, keep=None):
        self.calls, self.keep = [], keep

    def __call__(self, argv, log):
        self.calls.append(list(argv))
        rc = zo_finetune(argv)
        out = argv[argv.index("--out") + 1] if "--out" in argv else None
        if self.keep is not None and out is not None:
            shutil.copy(f"{out}/checkpoint.pt", self.keep)
        return rc


@pytest.fixture(scope="module")
def ranked(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("rank") / "r"
    runner = InProcess()
    rc = rank(["--out", str(out), "--methods", ",".join(METHODS_RANKED), *GRID, *_extra(tiny)], runner=runner)
    return {"out": out, "rc": rc, "calls": runner.calls, "json": json.loads((out / "ranking.json").read_text())}


def _results(path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------ the plan (no runs)
def test_grid_from_the_registry_defaults(tmp_path):
    assert DEFAULT_FACTORS == (0.25, 0.5, 1.0, 2.0)
    ms = default_methods()
    assert ms[-2:] == ["fo-sgd", "fo-adam"] and {"mezo", "mezo-svrg", "lozo", "hizoo", "fzoo"} <= set(ms)
    assert len(ms) == len(METHODS)                       # every registered method is ranked
    p = Plan(str(tmp_path), ["mezo", "mezo-svrg", "n-spsa", "fo-sgd"], DEFAULT_FACTORS, ["--q", "2"])
    # the README's defaults: MeZO 1e-4; MeZO-SVRG eta2 1e-4, eta1 5e-4 (scaled together); n-SPSA q x 1e-4
    assert [r.lr for r in p.grid("mezo")] == pytest.approx([2.5e-5, 5e-5, 1e-4, 2e-4])
    svrg = p.run("mezo-svrg", 2.0, 1)
    assert dict(svrg.rates) == pytest.approx({"lr_svrg": 2e-4, "lr_svrg_full": 1e-3})
    assert [r.lr for r in p.grid("n-spsa")] == pytest.approx([0.5e-4, 1e-4, 2e-4, 4e-4])
    argv = list(p.run("fo-sgd", 1.0, 0).argv)
    # FO at equal forward examples: 19,200 queries / 2,048 training examples
    assert float(argv[argv.index("--fo-epochs") + 1]) == 9.375 and float(argv[argv.index("--lr-fo-sgd") + 1]) == 1e-2
    assert "--no-memory" in argv and "--no-memory" not in p.run("fo-sgd", 1.0, 1).argv


@pytest.mark.parametrize("args, text", [
    (["--grid", "0.5,1"], "at least 4"),
    (["--seed", "1"], "do not pass --seed"),
    (["--lr-mezo", "1e-3"], "do not pass --lr-mezo"),
    (["--lanes", "2", "--threads", "1"], "--threads with --lanes"),
    (["--methods", "mezo,nope"], "unknown method 'nope'"),
    (["--grid", "1,2,x,4"], "comma list of numbers"),
    (["--grid=-1,1,2,4"], "distinct positive"),
    (["--grid", "0,1,2,4"], "distinct positive"),
    (["--lanes", "0"], "--lanes must be >= 1"),
    (["--queries", "0"], "--queries must be >= 1"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, text):
    assert rank(["--out", str(tmp_path / "r"), "--methods", "mezo", *args]) == 2
    err = capsys.readouterr().err
    assert text in err and err.startswith("rank: error:") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_choose_by_validation_never_test():
    def run(lr):
        return Run("mezo", lr, 0, (("lr_mezo", lr),), f"d{lr}", ())
    recs = [(run(1.0), {"val_acc": 0.6, "test_acc": 0.9, "train_loss": 0.1, "diverged": False}),
            (run(2.0), {"val_acc": 0.7, "test_acc": 0.5, "train_loss": 0.5, "diverged": False}),
            (run(3.0), {"val_acc": 0.7, "test_acc": 0.5, "train_loss": 0.4, "diverged": False}),   # tie: lower loss
            (run(4.0), {"val_acc": 0.9, "test_acc": 0.9, "train_loss": float("nan"), "diverged": True})]
    assert choice.choose(recs).lr == 3.0
    assert choice.choose(recs[:2] + [(run(0.5), dict(recs[1][1]))]).lr == 0.5      # full tie: the lower rate


# ------------------------------------------------------------------ one ranking on the tiny model
def test_rate_chosen_by_validation_accuracy(ranked):
    out, r = ranked["out"], ranked["json"]
    assert ranked["rc"] == 0 and r["incomplete"] == {}
    assert len(ranked["calls"]) == 2 * (2 + 2)                  # 2 methods x (2 rates + 2 more seeds)
    expected_lrs = {"mezo": [1e-2, 1e-1], "fo-sgd": [1.0, 10.0]}      # 100 and 1000 x 1e-4, x 1e-2
    for m in METHODS_RANKED:
        grid = [_results(p)["methods"][m] for p in sorted(out.glob(f"{m}/lr*/seed0/results.json"))]
        assert sorted(g["lr"] for g in grid) == pytest.approx(expected_lrs[m])
        best = min(grid, key=lambda g: (-g["val_acc"], g["train_loss"], g["lr"]))
        val_tie = grid[0]["val_acc"] == grid[1]["val_acc"]
        assert val_tie == (m == "fo-sgd")                       # the fixture uses both halves of the rule
        if not val_tie:
            assert best["train_loss"] > min(g["train_loss"] for g in grid)    # validation, not loss, decided
        e = r["methods"][m]
        assert e["chosen"]["lr"] == pytest.approx(best["lr"])
        assert sorted(g["lr"] for g in e["grid"]) == pytest.approx(sorted(g["lr"] for g in grid))
        assert sorted(g["val_acc"] for g in e["grid"]) == sorted(g["val_acc"] for g in grid)
        for s in (1, 2):                                        # the other seeds only at the chosen rate
            (d,) = out.glob(f"{m}/lr*/seed{s}")
            assert _results(d / "results.json")["methods"][m]["lr"] == pytest.approx(best["lr"])
        assert not list(out.glob(f"{m}/lr*/seed*/checkpoint.pt"))    # removed once results.json exists
    # equal queries: the FO reference sees as many forward examples as MeZO spends queries
    assert r["methods"]["fo-sgd"]["summary"]["queries"] == r["methods"]["mezo"]["summary"]["queries"] == 4 * 2 * 4


def test_ranking_json_says_what_it_must(ranked):
    out, r = ranked["out"], ranked["json"]
    assert set(r) == {"version", "settings", "machine", "methods", "order", "incomplete", "tuning",
                      "svrg_paper_setting", "batch_sizes"}
    assert r["svrg_paper_setting"] is None and r["batch_sizes"] is None
    assert r["incomplete"] == {} and r["tuning"] == {}
    means = {m: sum(s["test_acc"] for s in r["methods"][m]["seeds"]) / 3 for m in METHODS_RANKED}
    assert r["order"] == sorted(METHODS_RANKED, key=lambda m: -means[m])
    mezo_runs = {s["seed"]: _results(out / s["dir"] / "results.json")["methods"]["mezo"]
                 for s in r["methods"]["mezo"]["seeds"]}
    for m in METHODS_RANKED:
        e = r["methods"][m]
        assert {"name", "label", "kind", "tuned", "lr_flag", "default_lr", "grid", "chosen", "seeds",
                "summary"} <= set(e)
        assert e["name"] == m and e["summary"]["memory"] is None      # --no-memory
        assert [s["seed"] for s in e["seeds"]] == [0, 1, 2]
        for s in e["seeds"]:
            rec = _results(out / s["dir"] / "results.json")["methods"][m]
            for k in ("test_acc", "train_loss", "queries", "train_s"):
                assert s[k] == rec[k], (m, k)
            peak = max(p["test_acc"] for p in mezo_runs[s["seed"]]["curve"][1:])
            hit = next((p for p in rec["curve"][1:] if p["test_acc"] >= peak), None)
            assert s["mezo_peak"] == peak
            assert s["to_mezo_peak"] == (None if hit is None else {"queries": hit["queries"], "train_s": hit["train_s"]})
    assert r["methods"]["mezo"]["summary"]["to_mezo_peak"]["reached"] == 3        # MeZO reaches its own peak


def test_seeds_merge_as_merge_seeds(ranked, tmp_path):
    out, r = ranked["out"], ranked["json"]
    mod = load_script("scripts/merge_seeds.py", "merge_seeds")
    for m in METHODS_RANKED:
        dirs = [str(out / s["dir"]) for s in r["methods"][m]["seeds"]]
        assert mod.main([*dirs, "--out", str(tmp_path / m)]) == 0
        merged = _results(tmp_path / m / "results.json")["summary"]["methods"][m]
        for k in ("test_acc", "train_loss", "delta_test_acc", "train_s"):
            assert r["methods"][m]["summary"][k] == merged[k], (m, k)


def test_markdown_from_ranking_json_alone(ranked, capsys):
    out, r = ranked["out"], ranked["json"]
    capsys.readouterr()
    assert rank(["--markdown", str(out / "ranking.json")]) == 0
    text = capsys.readouterr().out
    assert text == (out / "ranking.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [f"`{m}`" in row for row, m in zip(rows, r["order"])] == [True, True]


# ------------------------------------------------------------------ rerun: skip, rerun, resume, refuse
def test_rerun_skips_reruns_and_resumes(ranked, tiny, tmp_path):  # noqa: F811
    out = tmp_path / "r"
    shutil.copytree(ranked["out"], out)
    args = ["--out", str(out), "--methods", ",".join(METHODS_RANKED), *GRID, *_extra(tiny)]
    idle = InProcess()
    assert rank(args, runner=idle) == 0 and idle.calls == []                  # every run finished: none runs
    assert json.loads((out / "ranking.json").read_text())["methods"] == ranked["json"]["methods"]

    d = out / ranked["json"]["methods"]["fo-sgd"]["grid"][0]["dir"]
    before = _results(d / "results.json")["methods"]["fo-sgd"]
    (d / "results.json").unlink()
    keep = tmp_path / "checkpoint.pt"
    again = InProcess(keep=keep)
    assert rank(args, runner=again) == 0
    assert [c[c.index("--out") + 1] for c in again.calls] == [str(d)]        # only the deleted run, in its place
    assert _results(d / "results.json")["methods"]["fo-sgd"]["val_acc"] == before["val_acc"]

    # killed after its last checkpoint: resumed with zo-finetune --resume, not started over
    (d / "results.json").unlink()
    shutil.copy(keep, d / "checkpoint.pt")
    resumed = InProcess()
    assert rank(args, runner=resumed) == 0
    assert resumed.calls == [["--resume", str(d), "--no-progress"]]
    after = _results(d / "results.json")["methods"]["fo-sgd"]
    assert (after["val_acc"], after["train_loss"]) == (before["val_acc"], before["train_loss"])
    assert not (d / "checkpoint.pt").exists()

    # a finished run made with other settings is refused, not overwritten
    res = _results(d / "results.json")
    argv = res["config"]["argv"]
    argv[argv.index("--steps") + 1] = "5"
    (d / "results.json").write_text(json.dumps(res))
    refused = InProcess()
    assert rank(args, runner=refused) == 1 and refused.calls == []
    r = json.loads((out / "ranking.json").read_text())
    assert "fo-sgd" not in r["methods"] and "other settings (steps)" in r["incomplete"]["fo-sgd"][0]
    assert _results(d / "results.json")["config"]["argv"] == argv


def test_lanes_run_side_by_side_with_one_thread(tmp_path, capsys):
    live, peak, calls, lock = [0], [0], [], threading.Lock()

    def failing(argv, log):
        with lock:
            calls.append(argv)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.5)
        with lock:
            live[0] -= 1
        return 3

    assert rank(["--out", str(tmp_path / "r"), "--methods", "mezo", "--lanes", "2"], runner=failing) == 1
    assert peak[0] == 2 and len(calls) == 4                                  # the grid only: no rate to pick
    assert all(c[c.index("--threads") + 1] == "1" for c in calls)
    r = json.loads((tmp_path / "r" / "ranking.json").read_text())
    assert r["methods"] == {} and len(r["incomplete"]["mezo"]) == 4 and "exited with code 3" in r["incomplete"]["mezo"][0]
    assert "mezo not ranked" in capsys.readouterr().err


def test_subprocess_runner_runs_zo_finetune(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "one"
    out.mkdir()
    argv = [*_extra(tiny), "--methods", "mezo", "--steps", "2", "--out", str(out), "--no-progress"]
    assert SubprocessRunner()(argv, str(out / "log")) == 0
    assert _results(out / "results.json")["methods"]["mezo"]["steps"] == 2
    assert "MeZO" in (out / "log").read_text()


# ------------------------------------------------------------------ the table's verdict (hand-made numbers)
def _entry(name, kind, mean, std):
    return {"name": name, "label": name.upper(), "kind": kind, "lr_flag": "--lr-x",
            "chosen": {"lr": 1e-4, "at_grid_edge": False},
            "summary": {"test_acc": {"mean": mean, "std": std}, "delta_test_acc": {"mean": 0.01, "std": 0.0},
                        "train_loss": {"mean": 0.5, "std": 0.0}, "queries": 100, "train_s": {"mean": 1, "std": 0},
                        "to_mezo_peak": None, "memory": {"peak_mb": 600.0, "x_inference": 1.5}}}


def _ranking(entries):
    return {"settings": {"queries": 100, "grid_factors": [0.25, 0.5, 1, 2], "tune_seed": 0, "seeds": [0, 1, 2],
                         "n_test": 512, "timing": "t"},
            "methods": {e["name"]: e for e in entries}, "order": [e["name"] for e in entries], "incomplete": {}}


def test_verdict_names_a_winner_only_beyond_one_std():
    fo = _entry("fo", "fo", 0.80, 0.01)
    clear = _ranking([fo, _entry("a", "zo", 0.70, 0.01), _entry("b", "zo", 0.68, 0.015), _entry("c", "zo", 0.6, 0.0)])
    assert table.verdict(clear).startswith("**Winner: A**")               # 0.02 > max(0.01, 0.015); FO is no candidate
    close = _ranking([fo, _entry("a", "zo", 0.70, 0.01), _entry("b", "zo", 0.685, 0.02), _entry("c", "zo", 0.6, 0.0)])
    v = table.verdict(close)
    assert v.startswith("No winner: B (0.685 ± 0.020) is within one standard deviation") and "C" not in v
    md = table.markdown(close)
    assert "| 1 | FO (`fo`) [FO] |" in md and "600 (1.50x)" in md and md.rstrip().endswith(v)


def test_rewrite_keeps_the_reserved_keys(tmp_path):
    p = str(tmp_path / "ranking.json")
    collect.write(p, {"methods": {}, "svrg_paper_setting": None, "batch_sizes": None})
    r = json.loads(open(p).read())
    r["svrg_paper_setting"], r["batch_sizes"] = {"queries": 1}, [{"batch": 8}]
    open(p, "w").write(json.dumps(r))
    collect.write(p, {"methods": {"x": 1}, "svrg_paper_setting": None, "batch_sizes": None})
    r = json.loads(open(p).read())
    assert r["methods"] == {"x": 1} and r["svrg_paper_setting"] == {"queries": 1} and r["batch_sizes"] == [{"batch": 8}]
    # carried reserved keys (older) never replace the file's own; batch-size studies join study by study
    r["batch_sizes"] = {"lm": [2]}
    open(p, "w").write(json.dumps(r))
    collect.write(p, {"methods": {}, "svrg_paper_setting": {"queries": 0}, "batch_sizes": {"lm": [0], "mlp_digits": [3]}})
    r = json.loads(open(p).read())
    assert r["svrg_paper_setting"] == {"queries": 1} and r["batch_sizes"] == {"lm": [2], "mlp_digits": [3]}


def test_equal_time_from_the_runs_curves(ranked):
    out, r = ranked["out"], ranked["json"]
    recs = {m: [_results(out / s["dir"] / "results.json")["methods"][m] for s in r["methods"][m]["seeds"]]
            for m in METHODS_RANKED}
    budget = min(x["train_s"] for rs in recs.values() for x in rs)
    assert r["settings"]["equal_time_s"] == budget
    for m, rs in recs.items():
        accs = []
        for x in rs:
            within = [p for p in x["curve"] if p["train_s"] <= budget]
            assert within and within[0]["train_s"] == 0                  # the start is always within
            accs.append(within[-1]["test_acc"])
        et = r["methods"][m]["summary"]["equal_time"]
        assert et["train_s"] == budget and et["test_acc"]["values"] == pytest.approx(accs)
    assert "test acc at equal time" in table.markdown(r)


def test_at_time_picks_the_last_point_within():
    curve = [{"train_s": 0.0, "test_acc": 0.5}, {"train_s": 10.0, "test_acc": 0.6}, {"train_s": 20.0, "test_acc": 0.7}]
    assert collect.at_time(curve, 19.9)["test_acc"] == 0.6
    assert collect.at_time(curve, 20.0)["test_acc"] == 0.7
    assert collect.at_time(curve, 5.0)["test_acc"] == 0.5


def test_tuning_table_names_each_unranked_methods_rates():
    r = _ranking([])
    r["tuning"] = {"lozo": {"grid": [{"lr": 2e-4, "rates": {"--lr-lozo": 2e-4}, "val_acc": 0.7, "train_loss": 0.5,
                                      "diverged": False},
                                     {"lr": 1e-4, "rates": {"--lr-lozo": 1e-4}, "val_acc": 0.6, "train_loss": 0.55,
                                      "diverged": False}],
                            "chosen": {"lr": 2e-4, "at_grid_edge": True}, "seeds_finished": 1},
                   "fzoo": {"grid": [{"lr": 1e-3, "rates": {"--lr-fzoo": 1e-3}, "val_acc": 0.5, "train_loss": 0.7,
                                      "diverged": True}], "chosen": None, "seeds_finished": 0}}
    text = table.markdown(r)
    assert "| `lozo` | 0.0001: 0.600 / 0.5500; **0.0002: 0.700 / 0.5000** | --lr-lozo 0.0002 (grid edge) | 1 / 3 |" in text
    assert "| `fzoo` | 0.001: 0.500 / 0.7000 (diverged) | grid not finished | 0 / 3 |" in text


def test_a_tuned_methods_seeds_go_ahead_of_the_waiting_grids(tmp_path):
    """One lane: mezo's 4 grid runs, then its seeds 1 and 2 before any lozo grid run (methods are ranked one
    after another, so an interrupted ranking holds whole entries)."""
    order = []

    def fake(argv, log):
        a = {k: argv[argv.index(k) + 1] for k in ("--methods", "--seed", "--out")}
        order.append((a["--methods"], int(a["--seed"])))
        rec = {"val_acc": 0.5, "train_loss": 0.6, "diverged": False}
        with open(f"{a['--out']}/results.json", "w") as f:
            json.dump({"config": {"argv": argv}, "methods": {a["--methods"]: rec}}, f)
        return 0

    from zo_kernels.finetune.ranking.runner import execute
    errors = execute(Plan(str(tmp_path), ["mezo", "lozo"], DEFAULT_FACTORS, lanes=1), fake, say=lambda s: None)
    assert errors == {}
    assert order == [("mezo", 0)] * 4 + [("mezo", 1), ("mezo", 2)] + [("lozo", 0)] * 4 + [("lozo", 1), ("lozo", 2)]


def test_ranking_png_and_its_mean_curves(ranked):
    from zo_kernels.finetune.ranking.plot import mean_curve
    assert (ranked["out"] / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seeds = ranked["json"]["methods"]["mezo"]["seeds"]
    xs, ys = mean_curve(seeds, "queries")
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x == pytest.approx(sum(s["curve"][i]["queries"] for s in seeds) / 3)
        assert y == pytest.approx(sum(s["curve"][i]["test_acc"] for s in seeds) / 3)
    assert len(xs) == len(seeds[0]["curve"])


# ------------------------------------------------------------------ carrying an earlier ranking over
_TIMED = {"carried_from", "train_s", "wall_s", "equal_time"}        # and the mark a carried entry gains


def _untimed(x):
    """`x` without its timings (a rerun's differ) and carry marks."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in _TIMED}
    return [_untimed(v) for v in x] if isinstance(x, list) else x


def test_carry_takes_the_ranked_methods_without_rerunning_them(ranked, tiny, tmp_path):  # noqa: F811
    """A ranking outlives its run directories: --carry takes the entries an earlier ranking.json holds, runs
    only the methods it lacks, and recomputes MeZO's peaks and the equal-time budget over both."""
    old = tmp_path / "old.json"
    r = ranked["json"]
    partial = {**r, "methods": {"mezo": r["methods"]["mezo"]}, "order": ["mezo"], "batch_sizes": {"lm": [1]}}
    old.write_text(json.dumps(partial))
    out = tmp_path / "r"
    runner = InProcess()
    args = ["--out", str(out), "--methods", ",".join(METHODS_RANKED), *GRID, *_extra(tiny), "--carry", str(old)]
    assert rank(args, runner=runner) == 0
    ran = {c[c.index("--methods") + 1] for c in runner.calls}
    assert ran == {"fo-sgd"} and len(runner.calls) == 2 + 2                  # fo-sgd's grid and seeds only
    assert not (out / "mezo").exists()
    new = json.loads((out / "ranking.json").read_text())
    assert new["methods"]["mezo"]["carried_from"] == str(old) and "carried_from" not in new["methods"]["fo-sgd"]
    assert new["settings"]["carried"] == {"from": str(old), "methods": ["mezo"], "machine": r["machine"]}
    assert new["batch_sizes"] == {"lm": [1]} and new["svrg_paper_setting"] is None      # reserved keys come along
    for m in METHODS_RANKED:      # every run is deterministic: the same entries as the ranking made in one go
        assert _untimed(new["methods"][m]) == _untimed(r["methods"][m]), m
    assert new["methods"]["mezo"]["seeds"] == r["methods"]["mezo"]["seeds"]       # carried: timings too
    budget = min(s["train_s"] for e in new["methods"].values() for s in e["seeds"])
    assert new["order"] == r["order"] and new["settings"]["equal_time_s"] == budget
    assert "Carried over from an earlier ranking" in table.markdown(new) and "`mezo`" in table.markdown(new)

    idle = InProcess()                  # all of it carried: nothing runs, the same ranking
    full = tmp_path / "full.json"
    full.write_text(json.dumps(r))
    assert rank([*args[:-1], str(full), "--out", str(tmp_path / "r2")], runner=idle) == 0 and idle.calls == []
    again = json.loads((tmp_path / "r2" / "ranking.json").read_text())
    assert {m: {k: v for k, v in e.items() if k != "carried_from"} for m, e in again["methods"].items()} == r["methods"]


@pytest.mark.parametrize("edit,args,text", [
    (None, ["--steps", "5"], "other settings (zo_finetune_args, queries)"),
    (None, ["--grid", "100,2000"], "other settings (grid_factors)"),
    (lambda r: r["methods"]["mezo"]["grid"][0]["rates"].update({"--lr-mezo": 3.0}), [], "mezo was tuned over other rates"),
    (lambda r: r.pop("settings"), [], "not a readable ranking.json"),
])
def test_carry_refuses_a_ranking_of_other_settings(ranked, tiny, tmp_path, capsys, edit, args, text):  # noqa: F811
    r = json.loads(json.dumps(ranked["json"]))
    if edit:
        edit(r)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(r))
    base = _extra(tiny)
    for k in range(0, len(args), 2):            # replace a pass-through option / the grid in place
        if args[k] in base:
            base[base.index(args[k]) + 1] = args[k + 1]
    grid = ["--grid", args[1], "--allow-short-grid"] if args[:1] == ["--grid"] else GRID
    idle = InProcess()
    assert rank(["--out", str(tmp_path / "r"), "--methods", ",".join(METHODS_RANKED), *grid, *base,
                 "--carry", str(old)], runner=idle) == 2
    err = capsys.readouterr().err
    assert text in err and err.startswith("rank: error:") and err.count("\n") == 1 and idle.calls == []
    assert not (tmp_path / "r").exists()
