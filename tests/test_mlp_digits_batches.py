"""The MLP batch-size study (python -m python.mlp_digits_batches; issue 25 item 2): the rates are chosen on
the validation split at batch 64, the batch rows run at the chosen rates with the same query budget, a run
the optimizer stops on a non-finite loss counts as diverged, and its files say so."""
import importlib
import json

import pytest

from optim_helpers import _one_thread  # noqa: F401 (autouse)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    mb = importlib.import_module("python.mlp_digits_batches")
    out = tmp_path_factory.mktemp("mlpb")
    into = out / "ranking.json"
    into.write_text(json.dumps({"batch_sizes": {"lm": [1]}, "methods": {}}))
    # MeZO lr 10 is far past stable on this MLP (it stops on a non-finite loss or ends above its start)
    res = mb.main(["--steps", "6", "--seeds", "2", "--batches", "8,64", "--mezo-grid", "1e-2,10",
                   "--svrg-grid", "0.5,1", "--out", str(out), "--into", str(into)])
    return {"mb": mb, "res": res, "out": out, "into": json.loads(into.read_text())}


def test_split_keeps_test_and_holds_out_validation(study):
    mb = study["mb"]
    full = mb.load_data(0)
    d = mb.split(full)
    assert len(d["Xtr"]) + len(d["Xva"]) == len(full["Xtr"]) and torch.equal(d["Xte"], full["Xte"])
    assert (len(d["Xtr"]), len(d["Xva"]), len(d["Xte"])) == (1150, 288, 359)


def test_rates_chosen_on_validation(study):
    res = study["res"]
    for m, rows in res["tuning"].items():
        assert all(r["on"] == "val" and r["batch"] == 64 and r["seed"] == 0 for r in rows)
        ok = [r for r in rows if not r["diverged"]]
        best = max(ok, key=lambda r: r["acc"])
        assert res["chosen"][m] == best["rate"]
    assert res["chosen"]["mezo"] == 1e-2                         # lr 10 diverged: never chosen
    assert any(r["diverged"] for r in res["tuning"]["mezo"])


def test_batch_rows_at_the_chosen_rates_and_equal_queries(study):
    res = study["res"]
    q = res["setting"]["queries"]
    for r in res["runs"]:
        assert r["on"] == "test" and r["rate"] == res["chosen"][r["method"]]
        if not r["diverged"]:
            assert r["queries"] <= q and (r["method"] == "mezo" or r["queries"] > q - 2 * 1150 - 4 * r["batch"])
    for row in res["rows"]:
        runs = [r for r in res["runs"] if r["batch"] == row["batch"] and r["method"] == row["method"]]
        assert row["seeds"] == 2 == len(runs) and row["diverged"] == sum(r["diverged"] for r in runs)
        fin = [r["acc"] for r in runs if not r["diverged"]]
        if fin:
            assert row["test_acc"]["mean"] == pytest.approx(sum(fin) / len(fin))


def test_files_and_the_ranking_json(study):
    out, into = study["out"], study["into"]
    assert json.loads((out / "mlp_digits_batches.json").read_text())["rows"] == study["res"]["rows"]
    assert (out / "mlp_digits_batches.csv").read_text().count("\n") == 1 + len(study["res"]["runs"])
    assert into["batch_sizes"]["lm"] == [1]                       # the LM rows are kept
    assert into["batch_sizes"]["mlp_digits"]["rows"] == study["res"]["rows"]


def test_from_json_puts_an_earlier_result_in(study, tmp_path):
    into = tmp_path / "ranking.json"
    into.write_text(json.dumps({"batch_sizes": None, "order": ["mezo"]}))
    study["mb"].main(["--from-json", str(study["out"] / "mlp_digits_batches.json"), "--into", str(into)])
    r = json.loads(into.read_text())
    assert r["order"] == ["mezo"] and r["batch_sizes"]["mlp_digits"]["chosen"]["mezo"] == study["res"]["chosen"]["mezo"]


def test_an_unreadable_into_is_refused_before_the_study(study, tmp_path, monkeypatch):
    mb = study["mb"]
    monkeypatch.setattr(mb, "study", lambda args: pytest.fail("the study ran"))
    bad = tmp_path / "ranking.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="--into .*not a readable ranking.json"):
        mb.main(["--out", str(tmp_path / "o"), "--into", str(bad)])
    assert bad.read_text() == "{not json"


def test_an_into_damaged_during_the_study_is_one_line_and_left_as_it_is(study, tmp_path, monkeypatch):
    """--into was readable at the start; damaged by the time the study ends, it is refused in one line (no
    traceback), left byte-identical, and the study's own files are written."""
    mb, into = study["mb"], tmp_path / "ranking.json"
    into.write_text(json.dumps({"methods": {}}))

    def damaging_study(args):
        into.write_text("{torn")
        return study["res"]

    monkeypatch.setattr(mb, "study", damaging_study)
    with pytest.raises(SystemExit, match=r"^mlp_digits_batches: error: --into .*not a readable ranking.json"):
        mb.main(["--out", str(tmp_path / "o"), "--into", str(into)])
    assert into.read_text() == "{torn"
    assert json.loads((tmp_path / "o" / "mlp_digits_batches.json").read_text())["rows"] == study["res"]["rows"]


def test_the_rate_is_chosen_by_the_rankings_rule(study):
    """Diverged last, then validation accuracy, then train loss, then the lower rate -- as the ranking chooses."""
    best = study["mb"]._best
    row = lambda rate, acc, loss, div=False: {"rate": rate, "acc": acc, "train_loss": loss, "diverged": div}  # noqa: E731
    assert best([row(1e-3, 0.9, 0.5), row(1e-2, 0.95, 0.9)])["rate"] == 1e-2          # accuracy before loss
    assert best([row(1e-3, 0.9, 0.5), row(1e-2, 0.9, 0.4)])["rate"] == 1e-2           # then the lower loss
    assert best([row(1e-2, 0.9, 0.5), row(1e-3, 0.9, 0.5)])["rate"] == 1e-3           # then the lower rate
    assert best([row(1e-3, 0.5, 0.7), row(1e-2, 0.99, float("nan"), True)])["rate"] == 1e-3   # diverged last
    assert best([row([1e-2, 1e-3], 0.8, 0.5), row([2e-2, 2e-3], 0.8, 0.5)])["rate"] == [1e-2, 1e-3]
