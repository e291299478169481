"""The method registry from outside the package: a user's script defines an optimizer, registers it with
its own knobs before zo-finetune's `main`, and runs it with its own flags (issue: a new method is one
optimizer file + one registry entry).  Checked against MeZO, which the new method equals when its clip
never binds; the knob reaches the optimizer (a binding clip changes the run)."""
import json
import os
import subprocess
import sys

import pytest

from test_finetune_cli import REPO, _base, tiny  # noqa: F401  (the tiny model + data fixture)

pytest.importorskip("transformers")


def _doc_example() -> str:
    """The python block under docs/optimizers.md's "Registering a method in zo-finetune": the test runs
    the documented example itself."""
    text = open(os.path.join(REPO, "docs", "optimizers.md"), encoding="utf-8").read()
    section = text[text.index("## Registering a method in zo-finetune"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


SCRIPT = _doc_example()


def _run(tmp_path, *argv):
    script = tmp_path / "my_method.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_help_lists_the_new_methods_flags(tmp_path):
    p = _run(tmp_path, "--help")
    assert p.returncode == 0, p.stderr
    assert "zo-sgd-clip" in p.stdout and "--clip" in p.stdout and "--lr-zo-sgd-clip" in p.stdout


def test_method_registered_outside_runs_with_its_own_flags(tiny, tmp_path):  # noqa: F811
    runs = {}
    for clip in ("1e9", "1e-9"):
        out = tmp_path / f"clip{clip}"
        p = _run(tmp_path, *_base(tiny, out, "--methods", "mezo,zo-sgd-clip", "--steps", "4", "--evals", "1",
                                  "--no-memory", "--lr-mezo", "5e-2", "--clip", clip))
        assert p.returncode == 0, p.stderr[-2000:]
        runs[clip] = json.loads((out / "results.json").read_text())
    res = runs["1e9"]
    assert res["config"]["clip"] == 1e9 and res["config"]["methods"] == ["mezo", "zo-sgd-clip"]
    mezo, clip = res["methods"]["mezo"], res["methods"]["zo-sgd-clip"]
    # Its lr is derived from --lr-mezo by its own rule, and an unbinding clip is MeZO step for step.
    assert clip["lr"] == mezo["lr"] == 5e-2 and clip["steps"] == mezo["steps"] == 4
    assert clip["step_losses"] == mezo["step_losses"] and clip["train_loss"] == mezo["train_loss"]
    # A binding clip reaches the optimizer: the same steps, different weights after the first update.
    tight = runs["1e-9"]["methods"]["zo-sgd-clip"]
    assert tight["step_losses"][0] == mezo["step_losses"][0]
    assert tight["step_losses"][1:] != mezo["step_losses"][1:]


def test_bad_knob_value_is_one_line(tmp_path):
    p = _run(tmp_path, "--methods", "zo-sgd-clip", "--clip", "0")
    assert p.returncode == 2 and p.stderr.strip() == "zo-finetune: error: --clip must be > 0, got 0.0"


def test_registering_a_different_knob_under_a_taken_name_is_refused():
    from zo_kernels.finetune.registry import Knob, Method, register

    with pytest.raises(ValueError, match="lr_mezo"):
        register(Method("x", "X", "zo", lambda p, c: None, step_cost=lambda o, c, n: 0,
                        knobs=(Knob("lr_mezo", 1.0, "another"),)))
