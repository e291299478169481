"""zo-finetune CLI: a smoke run on a tiny random BERT + synthetic CSV, and clear errors on bad input."""
import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from zo_kernels.finetune.cli import main  # noqa: E402

POS = ["good", "great", "fun", "moving", "funny", "smart", "warm", "brilliant"]
NEG = ["bad", "dull", "boring", "awful", "flat", "tedious", "stale", "weak"]
FILL = ["the", "movie", "film", "was", "a", "story", "and", "plot", "really", "very", "is", "it"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT (with a WordPiece tokenizer) saved to a directory, and a synthetic CSV."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    model_dir = root / "model"
    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tok.save_pretrained(str(model_dir))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(str(model_dir))

    import random

    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(80):
        y = i % 2
        words = rng.sample(FILL, 4) + rng.sample(POS if y else NEG, 2)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{'pos' if y else 'neg'}")
    csv = root / "data.csv"
    csv.write_text("\n".join(rows) + "\n")
    return {"model": str(model_dir), "csv": str(csv), "root": root}


def _base(tiny, out, *extra):
    return ["--model", tiny["model"], "--dataset", tiny["csv"], "--n-train", "32", "--n-val", "16",
            "--n-test", "16", "--batch-size", "4", "--max-length", "16", "--threads", "1", "--out", str(out),
            "--no-progress", *extra]


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_smoke_all_methods_with_memory(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_base(tiny, out, "--methods", "mezo,mezo-svrg,fo-sgd", "--queries", "96", "--large-batch", "8",
                    "--q", "2", "--fo-epochs", "1", "--evals", "2", "--lr-mezo", "1e-3", "--lr-svrg", "1e-3",
                    "--lr-svrg-full", "2e-3", "--memory-steps", "1"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "MeZO-SVRG" in text and "| method" in text
    res = json.loads((out / "results.json").read_text())
    png = out / "curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert set(res["methods"]) == {"mezo", "mezo-svrg", "fo-sgd"}
    for m, r in res["methods"].items():
        for k in ("train_loss", "val_acc", "test_acc", "wall_s"):
            assert _finite(r[k]), (m, k, r[k])
        assert 0 <= r["test_acc"] <= 1 and r["steps"] >= 1
        assert len(r["curve"]) >= 2 and all(_finite(p["test_acc"]) for p in r["curve"])
        assert _finite(r["time_per_step_ms"]["forward"])
    # queries are counted from the closure calls and respect the budget
    assert res["methods"]["mezo"]["queries"] == res["methods"]["mezo"]["steps"] * 2 * 4 <= 96
    s = res["methods"]["mezo-svrg"]
    assert s["queries"] <= 96 and s["full_steps"] >= 1
    assert s["queries"] == s["full_steps"] * 2 * 8 + (s["steps"] - s["full_steps"]) * 4 * 4
    assert _finite(res["methods"]["mezo"]["time_per_step_ms"]["noise"])
    mem = res["memory"]
    for k in ("runtime", "inference", "mezo", "mezo-svrg", "fo-sgd"):
        assert "error" not in mem[k], mem[k]
        assert mem[k]["peak_rss_mb"] > 50
    assert mem["inference"]["x_inference"] == pytest.approx(1.0)


def test_partial_lookahead_anneal_no_memory(tiny, tmp_path):
    out = tmp_path / "run2"
    rc = main(_base(tiny, out, "--methods", "mezo,fo-adam", "--steps", "4", "--partial", "--lookahead",
                    "--anneal", "--fo-epochs", "0.5", "--evals", "1", "--no-memory"))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["params_trainable"] < res["model"]["params_total"]
    assert res["methods"]["mezo"]["steps"] == 4 and res["memory"] == {}
    assert _finite(res["methods"]["fo-adam"]["train_loss"])


@pytest.mark.parametrize("case,needle", [
    ("method", "unknown method 'sgd-zo'"),
    ("missing_file", "does not exist"),
    ("bad_file", "cannot read dataset file"),
    ("not_model", "is not a model directory"),
    ("too_few", "needs 1024"),
    ("bad_column", "no column 'nope'"),
])
def test_bad_input_clear_error(tiny, tmp_path, capsys, case, needle):
    out = str(tmp_path / "o")
    args = {"method": ["--methods", "mezo,sgd-zo"],
            "missing_file": ["--dataset", str(tmp_path / "nope.csv")],
            "not_model": ["--model", str(tmp_path)],
            "too_few": ["--n-train", "512", "--n-val", "256", "--n-test", "256"],
            "bad_column": ["--text-column", "nope"]}.get(case, [])
    if case == "bad_file":
        bad = tmp_path / "broken.csv.bz2"
        bad.write_bytes(b"this is not bzip2 data")
        args = ["--dataset", str(bad)]
    base = ["--model", tiny["model"], "--dataset", tiny["csv"], "--n-train", "32", "--n-val", "16",
            "--n-test", "16", "--batch-size", "4", "--out", out, "--no-progress", "--no-memory"]
    rc = main(base + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["--lr-mezo", "nan"], "--lr-mezo must be a finite number"),
    (["--lr-svrg", "-1"], "--lr-svrg must be >= 0"),
    (["--lr-svrg-full", "inf"], "--lr-svrg-full must be a finite number"),
    (["--eps", "nan"], "--eps must be a finite number"),
    (["--fo-epochs", "nan"], "--fo-epochs must be a finite number"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--lr-mezo", "2", "--weight-decay", "0.5"], "must be < 1"),
    (["--seed", "-3"], "--seed must be in [0, 2**64)"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_numbers_fail_up_front(tmp_path, capsys, args, needle):
    """Checked before anything is loaded: the model path does not even exist, and the error is the number's."""
    rc = main(["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), "--no-progress"] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_module_entry_point_bad_method_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "zo_kernels.finetune", "--methods", "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown method 'nope'" in lines[0] and "Traceback" not in p.stderr
