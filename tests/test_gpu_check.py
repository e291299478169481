"""scripts/gpu_check.sh on a CPU machine: the dry run reaches the first CUDA call of every part, and the
part runner keeps its time limits, carries on after a failure and writes the summary."""
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from helpers import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PARTS = ["env", "build", "pytest_cuda", "pytest_gpu", "bench_noise", "bench_lowrank", "bench_step", "seedlog",
         "quant", "finetune"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.pop("OUT", None)
    env.update(PYTHON=sys.executable, **extra)
    return env


def _tools():
    return load_script("scripts/gpu_check_tools.py", "gpu_check_tools")


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run of the whole check, from an unrelated working directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    out = tmp_path_factory.mktemp("out")
    # The limits are sized for the GPU machine; a busy 2-core CI machine imports torch far slower.
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=cwd, capture_output=True, text=True,
                       env=_env(GPU_CHECK_LIMIT_SCALE="20", GPU_CHECK_BUDGET="20000"), timeout=1800)
    return {"r": r, "out": out, "cwd": cwd, "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow  # ~30 s of CPU: nine python processes importing torch
def test_dry_run_reaches_every_part(dry):
    r, s = dry["r"], dry["summary"]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert s["ok"] and s["dry_run"]
    assert [p["name"] for p in s["parts"]] == PARTS
    for p in s["parts"]:
        assert p["status"] == "pass" and p["rc"] == 0, p
        assert 0 < p["seconds"] <= p["limit_s"], p
    log = (dry["out"] / "gpu_check.log").read_text()
    # The CUDA parts ran for real up to their first CUDA call (arguments parsed, files and imports found).
    # + seedlog, + quant where bitsandbytes is importable (else the part says so and reaches none)
    want = 7 if "bitsandbytes is not importable" not in log else 6
    assert log.count("dry-run: OK, reached the first CUDA call") == want, log[-3000:]
    for flag in ("--device cuda", "--sizes 1e6,1e7,1e8", "--lowrank", "--models opt-125m,opt-1.3b", "-m cuda"):
        assert flag in log
    import torch

    assert s["env"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        s["env"]["versions"]["torch"] == torch.__version__
    assert s["budget_s"] == 20000 and 0 < s["total_s"]


def _part_log(log, name):
    """What part `name` wrote to the log (between its start and end lines)."""
    return log.split(f"=== {name} (")[1].split(f"=== {name}: ")[0]


@pytest.mark.slow  # the dry run's (shared with the test above)
def test_dry_run_selects_the_scaled_form_and_the_optimizers_gpu_runs(dry):
    """The pytest parts' selections (collected in the dry run) hold the scaled form's tests (pytest_gpu: its
    backend lists gain Triton and the CUDA C++ kernel on a GPU) and the optimizers' GPU runs (pytest_cuda:
    HiZOO with both σ dtypes and the seeded ZO-Adam on both GPU kernels)."""
    log = (dry["out"] / "gpu_check.log").read_text()
    gpu, cuda = _part_log(log, "pytest_gpu"), _part_log(log, "pytest_cuda")
    assert "test_scaled_form.py::test_scaled_matches_float64_and_reference" in gpu
    assert "test_scaled_form.py::test_bf16_sigma_is_its_float32_value_bit_for_bit" in gpu
    for test in ("test_optim_hizoo.py::test_matches_authors_update_step_by_step",
                 "test_optim_hizoo.py::test_bf16_sigma_matches_authors_update_step_by_step",
                 "test_optim_zo_adam_seeded.py::test_truncated_window_matches_its_float64_definition"):
        for backend in ("triton", "cuda"):
            assert re.search(rf"{re.escape(test)}\[[^\]]*{backend}-cuda\]", cuda), (test, backend)


def test_dry_run_writes_only_its_outputs(dry):
    assert list(dry["cwd"].iterdir()) == []
    files = sorted(str(p.relative_to(dry["out"])) for p in dry["out"].rglob("*") if p.is_file())
    assert files == ["gpu_check.log", "summary.json"]


def test_part_limits_failures_budget_and_summary(tmp_path):
    """Sourced, the script only defines its functions: drive the part runner directly."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        source {SCRIPT}
        init {out} 0 || exit 9
        part slow 60 -c "import time; time.sleep(60)"
        part bad 20 -c "raise SystemExit(3)"
        part good 100 -c "print('good ran')"
        BUDGET=0
        part late 10 -c "print('late ran')"
        finish
    """)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_env(GPU_CHECK_BUDGET="45",
                                                                      GPU_CHECK_LIMIT_SLOW="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    parts = {p["name"]: p for p in s["parts"]}
    assert list(parts) == ["slow", "bad", "good", "late"]
    assert parts["slow"]["status"] == "timeout" and parts["slow"]["rc"] == 124
    assert parts["slow"]["limit_s"] == 1 and parts["slow"]["seconds"] < 10   # GPU_CHECK_LIMIT_SLOW won
    assert parts["bad"]["status"] == "fail" and parts["bad"]["rc"] == 3
    assert parts["good"]["status"] == "pass"
    assert 20 < parts["good"]["limit_s"] < 30    # cut to what is left of the 45 s budget (15 s kept)
    assert parts["late"]["status"] == "skipped"
    assert not s["ok"] and not s["dry_run"]
    log = (out / "gpu_check.log").read_text()
    assert "good ran" in log and "late ran" not in log


def test_dry_run_stand_in_exit_codes(tmp_path):
    cases = {"import torch\ntorch.zeros(1, device='cuda')\n": 0,            # reached CUDA
             "import argparse\nargparse.ArgumentParser().parse_args()\n": 2,  # stopped before (bad argument)
             "print('no gpu touched')\n": 3}                                   # never reached CUDA
    for i, (code, want) in enumerate(cases.items()):
        f = tmp_path / f"s{i}.py"
        f.write_text(code)
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_tools.py"), "dry-run", str(f),
                            "--bogus"], capture_output=True, text=True, timeout=120, env=_env())
        assert r.returncode == want, (code, r.stdout, r.stderr)


def test_junit_counts(tmp_path):
    x = tmp_path / "j.xml"
    x.write_text('<testsuites><testsuite>'
                 '<testcase classname="t" name="a"/>'
                 '<testcase classname="t" name="b"><failure message="x"/></testcase>'
                 '<testcase classname="t" name="c"><skipped/></testcase>'
                 '<testcase classname="t" name="d"><error message="y"/></testcase>'
                 '</testsuite></testsuites>')
    c = _tools().junit_counts(str(x))
    assert (c.passed, c.failed, c.skipped, c.errors) == (1, 1, 1, 1)
    assert c.failures == ["t::b", "t::d"]
