"""zo-finetune --resume: a run killed with SIGKILL (mid-MeZO, then mid-MeZO-SVRG) and resumed ends with
weights bit-identical to an uninterrupted run, and the same eval history; bad --resume input is refused."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_finetune_cli import _base, tiny  # noqa: F401  (the tiny model + data fixture)

torch = pytest.importorskip("torch")

from zo_kernels.finetune.cli import main  # noqa: E402

ARGS = ["--methods", "mezo,mezo-svrg", "--steps", "80", "--evals", "3", "--no-memory", "--q", "3",
        "--large-batch", "16", "--lr-mezo", "1e-3", "--lr-svrg", "1e-3", "--lr-svrg-full", "2e-3",
        "--checkpoint-every", "4", "--save-weights", "--lookahead", "--lr-schedule", "linear"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      env.get("PYTHONPATH")]))
    return env


def _cmd(*args):
    return [sys.executable, "-m", "zo_kernels.finetune", *args]


def _active(out):
    """(method, step) of the checkpoint's method in progress, or None."""
    p = out / "checkpoint.pt"
    if not p.exists():
        return None
    try:
        st = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        return None
    cur = st.get("current")
    if not cur or not cur.get("active"):
        return None
    return cur["active"]["method"], int(cur["active"]["step"])


def _kill_when(proc, out, method, min_step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed in {method}: rc {proc.returncode}\n"
                                 + proc.stderr.read()[-2000:])
        a = _active(out)
        if a is not None and a[0] == method and a[1] >= min_step:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return a
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint of {method} at step >= {min_step} within {timeout} s")


def test_sigkill_then_resume_is_bit_identical(tiny, tmp_path):  # noqa: F811
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(*_base(tiny, ref, *ARGS)), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "killed"
    p = subprocess.Popen(_cmd(*_base(tiny, out, *ARGS)), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    first = _kill_when(p, out, "mezo", 20)
    # resume, and kill again inside MeZO-SVRG
    p = subprocess.Popen(_cmd("--resume", str(out), "--no-progress"), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    second = _kill_when(p, out, "mezo-svrg", 12)
    assert first[0] == "mezo" and second[0] == "mezo-svrg"
    r = subprocess.run(_cmd("--resume", str(out), "--no-progress"), env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    for m in ("mezo", "mezo-svrg"):
        a = torch.load(ref / "weights" / f"seed0_{m}.pt", weights_only=True)
        b = torch.load(out / "weights" / f"seed0_{m}.pt", weights_only=True)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (m, k)       # bit-identical, not merely close
    ra = json.loads((ref / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    for m in ("mezo", "mezo-svrg"):
        ca, cb = ra["methods"][m]["curve"], rb["methods"][m]["curve"]
        assert [(p["queries"], p["train_loss"], p["test_acc"]) for p in ca] == \
               [(p["queries"], p["train_loss"], p["test_acc"]) for p in cb]
        assert [x[:2] for x in ra["methods"][m]["step_losses"]] == [x[:2] for x in rb["methods"][m]["step_losses"]]
        assert ra["methods"][m]["val_acc"] == rb["methods"][m]["val_acc"]
    assert not [n for n in os.listdir(out) if ".tmp." in n]
    # the weights really moved (otherwise bit-identity would be trivial)
    init = torch.load(ref / "weights" / "seed0_mezo.pt", weights_only=True)
    svrg = torch.load(ref / "weights" / "seed0_mezo-svrg.pt", weights_only=True)
    assert any(not torch.equal(init[k], svrg[k]) for k in init)


def test_resume_refuses_bad_input(tiny, tmp_path, capsys):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--resume", str(empty)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["--resume", str(empty), "--lr-mezo", "1"]) == 2
    assert "do not also pass --lr-mezo" in capsys.readouterr().err
    (empty / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["--resume", str(empty)]) == 2
    assert "cannot read checkpoint.pt" in capsys.readouterr().err
    assert main(_base(tiny, tmp_path / "o", "--checkpoint-every", "-1")) == 2
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err
