"""scripts/merge_seeds.py: two single-seed runs merged give the accuracy/loss summary of one
`--seeds 0,1` run (every seed's run is deterministic and independent); differing settings are refused."""
import json

import pytest

from helpers import load_script
from test_finetune_cli import _base, tiny  # noqa: F401  (the tiny model + data fixture)

torch = pytest.importorskip("torch")

from zo_kernels.finetune.cli import main  # noqa: E402


def _merge_module():
    return load_script("scripts/merge_seeds.py", "merge_seeds")


ARGS = ["--methods", "mezo,mezo-svrg", "--steps", "6", "--evals", "2", "--no-memory", "--q", "2",
        "--large-batch", "8", "--lr-mezo", "1e-3"]


def test_merge_equals_multi_seed_run(tiny, tmp_path):  # noqa: F811
    for name, seeds in (("s0", ["--seed", "0"]), ("s1", ["--seed", "1"]), ("both", ["--seeds", "0,1"])):
        assert main(_base(tiny, tmp_path / name, *ARGS, *seeds)) == 0
    mod = _merge_module()
    assert mod.main([str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    assert merged["summary"]["seeds"] == both["summary"]["seeds"] == [0, 1]
    for m in ("mezo", "mezo-svrg"):
        a, b = merged["summary"]["methods"][m], both["summary"]["methods"][m]
        for k in ("test_acc", "train_loss", "delta_test_acc", "best_test_acc"):
            assert a[k] == b[k], (m, k)
        assert a["curve"]["test_acc"] == b["curve"]["test_acc"]
    assert (tmp_path / "merged" / "curves.png").stat().st_size > 0


def test_merge_refuses_other_settings_and_repeated_seeds(tiny, tmp_path):  # noqa: F811
    assert main(_base(tiny, tmp_path / "a", *ARGS, "--seed", "0")) == 0
    assert main(_base(tiny, tmp_path / "b", *ARGS, "--seed", "1", "--eps", "2e-3")) == 0
    mod = _merge_module()
    with pytest.raises(SystemExit, match="differ in eps"):
        mod.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="a seed appears twice"):
        mod.main([str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "m")])
