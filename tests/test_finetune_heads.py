"""zo-finetune's label-description head (zero-shot start computed independently, in float64) and
--objective accuracy (ZO on the minibatch error rate: runs and moves the weights)."""
import json

import numpy as np
import pytest

from test_finetune_cli import _base, tiny  # noqa: F401  (the tiny model + data fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zo_kernels.finetune.cli import main  # noqa: E402
from zo_kernels.finetune.data import load_text_classification  # noqa: E402
from zo_kernels.finetune.heads import default_descriptions  # noqa: E402
from zo_kernels.finetune.model import load_model_and_tokenizer  # noqa: E402


def _pooled64(encoder, tok, texts, max_length=16):
    """Masked mean of the last hidden states, in float64, one text at a time (no padding at all)."""
    out = []
    with torch.no_grad():
        for t in texts:
            e = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
            h = encoder(input_ids=e["input_ids"], attention_mask=e["attention_mask"]).last_hidden_state[0]
            out.append(h.double().mean(0).numpy())
    return np.stack(out)


def test_zero_shot_start_matches_independent_cosine_classifier(tiny, tmp_path):  # noqa: F811
    T = 0.07
    out = tmp_path / "zs"
    rc = main(_base(tiny, out, "--methods", "mezo", "--steps", "1", "--evals", "1", "--no-memory",
                    "--temperature", str(T)))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["head"] == "description"
    assert res["config"]["label_descriptions"] == ["This is a negative review.", "This is a positive review."]

    # Independent transcription: plain AutoModel, descriptions and texts pooled one by one in float64.
    enc = transformers.AutoModel.from_pretrained(tiny["model"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    data = load_text_classification(tiny["csv"], n_train=32, n_val=16, n_test=16, seed=0)
    w = _pooled64(enc, tok, res["config"]["label_descriptions"])
    x = _pooled64(enc, tok, data.test.texts)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    logits = x @ w.T / T
    acc = float(np.mean(logits.argmax(1) == data.test.labels))
    z = logits - logits.max(1, keepdims=True)
    ce = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), data.test.labels]))
    assert res["start"]["test_acc"] == pytest.approx(acc, abs=1e-12)
    assert res["start"]["test_loss"] == pytest.approx(ce, rel=1e-4, abs=1e-5)

    # and the module's logits match the transcription example by example
    net, tok2 = load_model_and_tokenizer(tiny["model"], 2, head="description", temperature=T,
                                         descriptions=default_descriptions(data.label_names))
    with torch.no_grad():
        for i, t in enumerate(data.test.texts[:6]):
            e = tok2(t, truncation=True, max_length=16, return_tensors="pt")
            got = net(input_ids=e["input_ids"], attention_mask=e["attention_mask"]).logits[0].double().numpy()
            np.testing.assert_allclose(got, logits[i], rtol=1e-4, atol=1e-4)


def test_fresh_head_is_the_sequence_classifier(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "fresh"
    assert main(_base(tiny, out, "--methods", "mezo", "--steps", "2", "--evals", "1", "--no-memory",
                      "--head", "fresh")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["head"] == "fresh" and res["model"]["architecture"] == "BertForSequenceClassification"


def test_objective_accuracy_runs_and_moves_the_weights(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "acc"
    b = 8
    rc = main(_base(tiny, out, "--methods", "mezo,mezo-svrg", "--steps", "20", "--evals", "2", "--no-memory",
                    "--objective", "accuracy", "--eps", "0.05", "--lr-mezo", "0.05", "--lr-svrg", "0.05",
                    "--lr-svrg-full", "0.05", "--large-batch", "16", "--batch-size", str(b), "--save-weights"))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["objective"] == "accuracy"
    data = load_text_classification(tiny["csv"], n_train=32, n_val=16, n_test=16, seed=0)
    init, _ = load_model_and_tokenizer(tiny["model"], 2, head="description",
                                       descriptions=default_descriptions(data.label_names))
    init = init.state_dict()
    for m in ("mezo", "mezo-svrg"):
        w = torch.load(out / "weights" / f"seed0_{m}.pt", weights_only=True)
        moved = sum(float((w[k].double() - init[k].double()).abs().max()) for k in init)
        assert moved > 0, m
    # MeZO's step loss is (l+ + l-)/2 of two minibatch error rates: a multiple of 1/(2b), in [0, 1]
    for _, loss, _full in res["methods"]["mezo"]["step_losses"]:
        assert 0.0 <= loss <= 1.0 and abs(loss * 2 * b - round(loss * 2 * b)) < 1e-5
