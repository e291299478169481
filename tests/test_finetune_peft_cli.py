"""zo-finetune --peft: LoRA runs end to end (ZO and first-order methods, memory processes included)
on the tiny model of test_finetune_cli; prefix tuning on an encoder is one clear error."""
import json

import pytest

pytest.importorskip("peft")
from zo_kernels.finetune.cli import main  # noqa: E402

from test_finetune_cli import _base, tiny  # noqa: E402,F401 (fixture)


@pytest.mark.parametrize("head,methods,memory", [("description", "mezo,mezo-svrg,fo-sgd", True),
                                                  ("fresh", "mezo", False)])
def test_lora_run_trains_the_adapter_only(tiny, tmp_path, capsys, head, methods, memory):  # noqa: F811
    out = tmp_path / "run"
    rc = main(_base(tiny, out, "--peft", "lora", "--lora-rank", "2", "--head", head, "--methods", methods,
                    "--queries", "64", "--large-batch", "8", "--q", "2", "--fo-epochs", "1", "--evals", "2",
                    "--lr-mezo", "1e-2", "--lr-svrg", "1e-2", "--lr-svrg-full", "1e-2", "--memory-steps", "1",
                    *([] if memory else ["--no-memory"])))
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["peft"] == "lora" and res["config"]["lora_rank"] == 2
    model = res["model"]
    assert 0 < model["params_trainable"] < model["params_total"] // 5
    assert model["tuning"] == "LoRA r=2" and model["architecture"] != "PeftModel"
    assert "LoRA r=2 FT" in capsys.readouterr().out
    for m in methods.split(","):
        assert res["methods"][m]["steps"] > 0
        if memory:
            assert "error" not in res["memory"][m]


@pytest.mark.parametrize("extra,needle", [
    (["--peft", "prefix"], "--peft prefix"),
    (["--peft", "lora", "--partial", "1"], "give --peft or --partial"),
    (["--peft", "lora", "--lora-targets", "nope"], "--peft lora"),
    (["--peft", "lora", "--lora-alpha", "0"], "--lora-alpha"),
])
def test_peft_bad_input_is_one_line(tiny, tmp_path, capsys, extra, needle):  # noqa: F811
    rc = main(_base(tiny, tmp_path / "o", "--methods", "mezo", "--queries", "16", "--no-memory", *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
