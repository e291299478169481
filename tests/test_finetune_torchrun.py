"""zo-finetune runs unchanged under torchrun: 2 gloo ranks give the single-process trajectory."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from test_finetune_cli import _base, tiny  # noqa: F401  (the tiny model + data fixture)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed beside this Python")
def test_torchrun_two_ranks_matches_one_process(tiny, tmp_path):  # noqa: F811
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    args = ["--methods", "mezo,mezo-svrg", "--steps", "6", "--evals", "1", "--no-memory", "--q", "2",
            "--large-batch", "8"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    one = tmp_path / "one"
    r1 = subprocess.run([sys.executable, "-m", "zo_kernels.finetune", *_base(tiny, one, *args)],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    two = tmp_path / "two"
    r2 = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                         "--master-port", str(_free_port()), "-m", "zo_kernels.finetune",
                         *_base(tiny, two, *args)], env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert b["config"]["world_size"] == 2
    for m in ("mezo", "mezo-svrg"):
        assert a["methods"][m]["queries"] == b["methods"][m]["queries"]
        la = [x[1] for x in a["methods"][m]["step_losses"]]
        lb = [x[1] for x in b["methods"][m]["step_losses"]]
        # Same z, same batches split over ranks: per-step losses agree to float32 round-off.
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4 * max(1.0, max(abs(x) for x in la))
