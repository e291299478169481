"""zo-finetune --bitfit: exactly the biases, normalisation weights and head train; every other weight
is bit-identical after a run; it is refused with --partial/--peft."""
import json

import pytest

from test_finetune_cli import _base, tiny  # noqa: F401  (the tiny model + data fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zo_kernels.finetune.cli import main  # noqa: E402


def test_bitfit_selection_on_bert(tiny):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    from zo_kernels.finetune.model import select_trainable

    net = AutoModelForSequenceClassification.from_pretrained(tiny["model"])
    chosen = {id(p) for p in select_trainable(net, None, bitfit=True)}
    names = {n for n, p in net.named_parameters() if id(p) in chosen}
    # written out independently of the selection rule: BERT's biases, LayerNorms and the classifier
    expect = {n for n, _ in net.named_parameters()
              if n.endswith(".bias") or "LayerNorm" in n or n.startswith("classifier.")}
    assert names == expect
    assert all(p.requires_grad == (id(p) in chosen) for p in net.parameters())
    assert not any("word_embeddings" in n or n.endswith("query.weight") for n in names)


def test_bitfit_run_moves_only_the_chosen_weights(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "bf"
    assert main(_base(tiny, out, "--methods", "mezo", "--steps", "5", "--evals", "1", "--no-memory",
                      "--bitfit", "--lr-mezo", "1e-2", "--head", "fresh", "--save-weights")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["params_trainable"] < res["model"]["params_total"] / 2
    from transformers import AutoModelForSequenceClassification

    init = AutoModelForSequenceClassification.from_pretrained(tiny["model"]).state_dict()
    after = torch.load(out / "weights" / "seed0_mezo.pt", weights_only=True)
    moved = {k for k in init if not torch.equal(init[k], after[k])}
    assert moved and all(k.endswith(".bias") or "LayerNorm" in k or k.startswith("classifier.") for k in moved)


def test_bitfit_refused_with_partial(tiny, tmp_path, capsys):  # noqa: F811
    assert main(_base(tiny, tmp_path / "o", "--methods", "mezo", "--steps", "2", "--no-memory", "--bitfit",
                      "--partial", "1")) == 2
    assert "give --bitfit alone" in capsys.readouterr().err
