"""benchmarks/bench_step.py on a tiny random BERT and a tiny OPT config: rows, CSV and PNG, and the
three variants change the weights the same way (one MeZO step, same batch, same lr)."""
import csv

import pytest

from helpers import load_script

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def _load():
    return load_script("benchmarks/bench_step.py", "bench_step")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("bert")
    cfg = BertConfig(vocab_size=30000, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(str(d))
    return str(d)


def test_bench_step_writes_csv_and_png(tiny_bert, tmp_path):
    bs = _load()
    rows = bs.main(["--device", "cpu", "--models", tiny_bert, "--batch", "2", "--seq", "8", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["paper", "fused", "lookahead"]
    assert [r["noise_passes"] for r in rows] == [4, 3, 2]
    for r in rows:
        assert r["forward_ms"] > 0 and r["noise_ms"] > 0 and r["noise_to_forward"] > 0
    with open(tmp_path / "bench_step_cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (tmp_path / "bench_step_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_fused_steps_match_each_other(tiny_bert):
    """fused and lookahead (after settling the pending +mu z) reach the same weights after two steps."""
    bs = _load()
    from zo_kernels import noise_axpy_

    net, vocab, kind = bs.build_model(tiny_bert, "cpu", torch.float32)
    batch = bs.make_batch(kind, vocab, 2, 8, "cpu")
    theta0 = [p.detach().clone() for p in net.parameters()]
    out = {}
    for v in ("fused", "lookahead"):
        with torch.no_grad():
            for p, t in zip(net.parameters(), theta0):
                p.copy_(t)
        st = bs.Stepper(net, batch, "cpu", lr=1e-2)
        for _ in range(2):
            getattr(st, "step_" + v)()
        if st.pending is not None:
            noise_axpy_(st.params, [st.pending], [-st.eps])
        out[v] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(out["fused"], out["lookahead"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert any((a - t).abs().max() > 0 for a, t in zip(out["fused"], theta0))


def test_opt_tiny_config_builds():
    bs = _load()
    net, vocab, kind = bs.build_model("opt-tiny", "cpu", torch.float32)
    assert kind == "causal-lm" and vocab == 50272
    assert sum(p.numel() for p in net.parameters()) > 1e6


def test_bench_step_zo_bench_variants(tiny_bert, tmp_path):
    """Every ZO-Bench optimizer variant runs one timed step through the public optimizers and reports
    its forward-pass count and noise work relative to fused MeZO."""
    bs = _load()
    rows = bs.main(["--device", "cpu", "--models", tiny_bert, "--batch", "2", "--seq", "8", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--out", str(tmp_path), "--variants", "zo-bench"])
    assert [r["variant"] for r in rows] == bs.GROUPS["zo-bench"]
    assert {r["variant"]: r["forward_passes"] for r in rows}["opt-cons"] == 5
    assert all(r["noise_ms"] > 0 and r["noise_vs_mezo"] is not None for r in rows)
    assert {r["variant"]: r["noise_vs_mezo"] for r in rows}["opt-mezo"] == 1.0


def test_bench_step_estimator_variants(tiny_bert, tmp_path):
    """The ±1, layer-sampled and FZOO variants run through the public optimizers; FZOO makes N + 1 = 9
    forward passes and 9 weight passes a step."""
    bs = _load()
    rows = bs.main(["--device", "cpu", "--models", tiny_bert, "--batch", "2", "--seq", "8", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--out", str(tmp_path), "--variants", "estimators"])
    by = {r["variant"]: r for r in rows}
    assert list(by) == list(bs.ESTIMATORS)
    assert (by["opt-fzoo"]["forward_passes"], by["opt-fzoo"]["noise_passes"]) == (9, 9)
    assert all(r["noise_ms"] > 0 for r in rows) and by["opt-mezo"]["noise_vs_mezo"] == 1.0
