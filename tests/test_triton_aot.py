"""The Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); its PTX is checked.

Checked: no local-memory traffic (spills, or libdevice's slow sin/cos range
reduction), vectorised global loads and stores on the aligned path, and fast
sin/cos.  Compiled in a subprocess without TRITON_INTERPRET.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

WIDE = {"float32": "v4", "bfloat16": "v2", "float16": "v2"}  # a quad: 16 or 8 bytes


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "zo_kernels.triton.aot", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cases = json.loads((out / "cases.json").read_text())
    return {name: (c, (out / c["file"]).read_text()) for name, c in cases.items()}


def _local(text):
    return re.search(r"\b(ld|st)\.local", text)


def test_every_case_targets_its_architecture(ptx):
    assert len(ptx) == 22
    for name, (case, text) in ptx.items():
        assert f".target sm_{case['cc']}" in text, name


def test_fast_paths_have_no_local_memory_and_vector_access(ptx):
    checked = 0
    for name, (case, text) in ptx.items():
        if not case.get("FAST", True):
            continue
        assert not _local(text), f"{name}: local-memory traffic"
        assert "sin.approx" in text and "cos.approx" in text, name
        if case.get("ALIGNED", True):
            w = WIDE[case["OUT"]]
            if case["HAS_X"]:
                assert re.search(rf"ld\.global(\.\w+)*\.{w}\.b32", text), f"{name}: no {w} loads"
            assert re.search(rf"st\.global(\.\w+)*\.{w}\.b32", text), f"{name}: no {w} stores"
            checked += 1
    assert checked == 18


def test_fp32_loads_are_128_bit(ptx):
    _, text = ptx["k1_fp32_sm90"]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", text)


def test_accurate_sincos_is_why_fast_is_used(ptx):
    """libdevice's accurate sin/cos bring a local-memory range-reduction path (docs/spec.md §1)."""
    _, text = ptx["k1_fp32_accurate_sincos_sm90"]
    assert _local(text) and "sin.approx" not in text
