"""The MeZO-SVRG paper-setting study (rank --svrg-paper; issue 25 item 2): its runs are the paper's setting
as the issue states it, each method's rate is chosen on validation from its own grid, the batch rows use
the chosen rates, the partial-ranking keys say what finished, and the results land in ranking.json's
reserved keys."""
import json

import pytest
from test_rank import InProcess, _extra

from test_finetune_cli import tiny  # noqa: F401  (the tiny model + data fixture)

torch = pytest.importorskip("torch")

from zo_kernels.finetune.cli import build_parser  # noqa: E402
from zo_kernels.finetune.errors import FinetuneError  # noqa: E402
from zo_kernels.finetune.ranking import collect, svrg_paper  # noqa: E402
from zo_kernels.finetune.ranking.cli import main as rank  # noqa: E402
from zo_kernels.finetune.ranking.plan import Grid, Plan  # noqa: E402


def _opt(argv, dest):
    return getattr(build_parser().parse_args(list(argv)), dest)


def test_the_runs_are_the_papers_setting(tmp_path):
    p = svrg_paper.paper_plan(str(tmp_path))
    # the statement of the paper's setting: fresh head, 512 training examples, full-batch anchor over
    # all of them, q = 2, batch 64; eta1 = 1e-4 with eta2 1e-5 and 1e-6 among MeZO-SVRG's candidates
    for m in ("mezo", "mezo-svrg"):
        for r in p.grid(m):
            a = build_parser().parse_args(list(r.argv))
            assert (a.head, a.n_train, a.q, a.batch_size, a.methods) == ("fresh", 512, 2, 64, m)
            assert a.large_batch >= a.n_train                       # the anchor is the whole training set
    pairs = {(dict(r.rates)["lr_svrg_full"], dict(r.rates)["lr_svrg"]) for r in p.grid("mezo-svrg")}
    assert {(1e-4, 1e-5), (1e-4, 1e-6)} <= pairs and len(pairs) == 4
    assert [r.lr for r in p.grid("mezo")] == pytest.approx([5e-4, 1e-3, 2e-3, 4e-3])
    for r in p.grid("mezo-svrg"):     # each run reads its pair from its own argument list
        assert (_opt(r.argv, "lr_svrg"), _opt(r.argv, "lr_svrg_full")) == (dict(r.rates)["lr_svrg"],
                                                                           dict(r.rates)["lr_svrg_full"])
    assert len({r.dir for m in ("mezo", "mezo-svrg") for r in p.grid(m)}) == 8
    assert p.n_runs() == 8 + 4                                  # two grids of 4, then 2 more seeds each


def test_a_grid_the_method_does_not_read_is_refused(tmp_path):
    with pytest.raises(FinetuneError, match="does not read"):
        Plan(str(tmp_path), ["mezo"], (1.0,), min_grid=1, grids={"mezo": Grid(((1.0, (("lr_svrg", 1e-4),)),))})
    with pytest.raises(FinetuneError, match="repeats a learning rate"):
        Plan(str(tmp_path), ["mezo-svrg"], (1.0,), min_grid=1, grids={"mezo-svrg": Grid((
            (1.0, (("lr_svrg", 1e-4), ("lr_svrg_full", 1e-3))), (2.0, (("lr_svrg", 1e-4), ("lr_svrg_full", 1e-2)))))})


TINY_GRIDS = {"mezo": Grid.scaled((("lr_mezo", 1e-2),), (1.0, 10.0), ("lr_mezo",)),
              "mezo-svrg": Grid(((1.0, (("lr_svrg", 1e-2), ("lr_svrg_full", 1e-1))),
                                 (10.0, (("lr_svrg", 1e-1), ("lr_svrg_full", 1e-1)))))}


@pytest.fixture(scope="module")
def study(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("svrg_paper")
    runner = InProcess()
    ex = _extra(tiny)
    i = ex.index("--batch-size")
    ex = [*ex[:i], *ex[i + 2:]]                                   # the study sets the batch itself
    j = ex.index("--steps")                                       # a budget in queries: the same at every batch
    extra = [*ex[:j], *ex[j + 2:], "--queries", "256", "--large-batch", "32"]
    into = out / "ranking.json"
    collect.write(str(into), {"version": 1, "methods": {}, "svrg_paper_setting": None, "batch_sizes": None})
    st = svrg_paper.run(str(out / "s"), extra, 1, 200, runner, into=str(into), say=lambda s: None, batch=8,
                        batches=(4,), grids=TINY_GRIDS)
    return {"out": out / "s", "study": st, "calls": runner.calls, "into": json.loads(into.read_text()),
            "extra": extra}


def test_rates_chosen_on_validation_and_used_at_every_batch(study):
    paper = study["study"]["svrg_paper_setting"]
    for m in ("mezo", "mezo-svrg"):
        e = paper["methods"][m]
        best = max(e["grid"], key=lambda g: (g["val_acc"], -g["train_loss"], -g["lr"]))
        assert e["chosen"]["rates"] == best["rates"]
        assert [s["seed"] for s in e["seeds"]] == [0, 1, 2]
    rows = study["study"]["batch_sizes"]["lm"]
    assert sorted((r["batch"], r["method"]) for r in rows) == [(4, "mezo"), (4, "mezo-svrg"), (8, "mezo"),
                                                               (8, "mezo-svrg")]
    for r in rows:
        res = json.loads((study["out"] / r["dir"] / "results.json").read_text())
        argv = res["config"]["argv"]
        assert _opt(argv, "batch_size") == r["batch"] and _opt(argv, "seed") == 0
        assert r["rates"] == paper["methods"][r["method"]]["chosen"]["rates"]
        assert r["test_acc"] == res["methods"][r["method"]]["test_acc"]
        for flag, v in r["rates"].items():
            assert _opt(argv, flag.lstrip("-").replace("-", "_")) == v


def test_results_go_into_the_ranking_json(study):
    into = study["into"]
    assert into["svrg_paper_setting"]["methods"].keys() == {"mezo", "mezo-svrg"}
    assert not {"svrg_paper_setting", "batch_sizes"} & set(into["svrg_paper_setting"])
    assert into["batch_sizes"]["lm"] == study["study"]["batch_sizes"]["lm"]
    assert (study["out"] / "svrg_paper.json").exists() and "Batch sizes" in (study["out"] / "svrg_paper.md").read_text()
    assert (study["out"] / "svrg_paper.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_runs_nothing(study, tiny):  # noqa: F811
    runner = InProcess()
    svrg_paper.run(str(study["out"]), study["extra"], 1, 200, runner, say=lambda s: None, batch=8, batches=(4,),
                   grids=TINY_GRIDS)
    assert runner.calls == []


def test_partial_tuning_is_reported(study, tmp_path):
    import pathlib
    import shutil
    out = tmp_path / "s"
    shutil.copytree(study["out"], out)
    plan = svrg_paper.paper_plan(str(out), study["extra"], batch=8, grids=TINY_GRIDS)
    e = study["study"]["svrg_paper_setting"]["methods"]["mezo"]
    (out / "paper" / e["seeds"][2]["dir"] / "results.json").unlink()         # a seed run not finished
    (pathlib.Path(plan.grid("mezo-svrg")[1].dir) / "results.json").unlink()   # a grid run not finished
    r = collect.collect(plan)
    assert set(r["methods"]) == set() and set(r["incomplete"]) == {"mezo", "mezo-svrg"}
    assert r["tuning"]["mezo"]["chosen"] == e["chosen"] and r["tuning"]["mezo"]["seeds_finished"] == 2
    assert r["tuning"]["mezo-svrg"]["chosen"] is None and len(r["tuning"]["mezo-svrg"]["grid"]) == 1


def test_cli_refuses_the_rankings_own_options(tmp_path, capsys):
    assert rank(["--svrg-paper", "--out", str(tmp_path / "x"), "--methods", "mezo"]) == 2
    assert "--svrg-paper has its own methods" in capsys.readouterr().err
    assert rank(["--out", str(tmp_path / "y"), "--into", str(tmp_path / "r.json")]) == 2
    assert "--into goes with --svrg-paper" in capsys.readouterr().err


def test_an_unreadable_into_is_refused_before_any_run(tmp_path, capsys):
    runner = InProcess()
    assert rank(["--svrg-paper", "--out", str(tmp_path / "x"), "--into", str(tmp_path / "missing.json")],
                runner=runner) == 2
    err = capsys.readouterr().err
    assert "--into" in err and "not a readable ranking.json" in err and err.count("\n") == 1
    assert runner.calls == []
