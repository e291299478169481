"""The Triton low-rank kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); PTX checks as
tests/test_triton_aot.py: the target, no local memory (spills), and θ's loads and stores vectorised on
the aligned path (one quad: v4 for fp32, v2 for bf16)."""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

WIDE = {"float32": "v4", "bfloat16": "v2", "float16": "v2"}
_SCRIPT = """
import json, sys
from zo_kernels.triton.lowrank import AOT_CASES, compile_ptx
out = {}
for cc in (80, 90):
    for name, const in AOT_CASES:
        out[f"{name}_sm{cc}"] = dict(const, cc=cc, ptx=compile_ptx(cc, **dict(const)))
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    path = tmp_path_factory.mktemp("lowrank_ptx") / "cases.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(path.read_text())


def test_targets_and_no_local_memory(ptx):
    assert len(ptx) == 10
    for name, case in ptx.items():
        text = case["ptx"]
        assert f".target sm_{case['cc']}" in text, name
        assert not re.search(r"\b(ld|st)\.local", text), f"{name}: local-memory traffic"


def test_aligned_path_vectorises_theta(ptx):
    checked = 0
    for name, case in ptx.items():
        if not case.get("ALIGNED", True):
            continue
        w = WIDE[case["OUT"]]
        assert re.search(rf"ld\.global(\.\w+)*\.{w}\.b32", case["ptx"]), f"{name}: no {w} θ loads"
        assert re.search(rf"st\.global(\.\w+)*\.{w}\.b32", case["ptx"]), f"{name}: no {w} θ stores"
        checked += 1
    assert checked == 8
