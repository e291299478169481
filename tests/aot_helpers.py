"""Shared pieces of the Triton ahead-of-time tests (test_triton_aot.py, test_triton_adam_aot.py,
test_triton_lowrank_aot.py): compiling in a subprocess without TRITON_INTERPRET (no GPU needed), and
the PTX patterns they check."""
import json
import os
import re
import subprocess
import sys

import pytest

WIDE = {"float32": "v4", "bfloat16": "v2", "float16": "v2"}  # a quad: 16 or 8 bytes

# Compiles every AOT_CASES entry of one kernel module for sm_80 and sm_90 into a JSON file.
_CASES_SCRIPT = """
import importlib, json, sys
mod = importlib.import_module(sys.argv[1])
out = {}
for cc in (80, 90):
    for name, const in mod.AOT_CASES:
        out[f"{name}_sm{cc}"] = dict(const, cc=cc, ptx=mod.aot_ptx(cc, **dict(const)))
json.dump(out, open(sys.argv[2], "w"))
"""


def run_compiled(args):
    """Runs `python args...` without TRITON_INTERPRET (which would stop Triton compiling)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def compile_cases(module, tmp):
    """{case_smCC: dict(constants, cc=CC, ptx=text)} for every AOT_CASES entry of `module`."""
    path = tmp / "cases.json"
    run_compiled(["-c", _CASES_SCRIPT, module, str(path)])
    return json.loads(path.read_text())


def local_memory(text):
    return re.search(r"\b(ld|st)\.local", text)


def vector_access(op, width, text):
    """`op` ("ld" or "st") global accesses of `width` ("v4", "v2") 32-bit lanes in the PTX."""
    return re.findall(rf"{op}\.global(\.\w+)*\.{width}\.b32", text)


def module_ptx(module, folder):
    """A module-scoped `ptx` fixture: compile_cases(module), once per test module."""
    @pytest.fixture(scope="module")
    def ptx(tmp_path_factory):
        return compile_cases(module, tmp_path_factory.mktemp(folder))
    return ptx


def check_targets_and_no_local_memory(ptx, count):
    """`count` cases, each PTX for its own sm_<cc>, none with local-memory traffic (spills)."""
    assert len(ptx) == count
    for name, case in ptx.items():
        assert f".target sm_{case['cc']}" in case["ptx"], name
        assert not local_memory(case["ptx"]), f"{name}: local-memory traffic"


def aligned_cases(ptx, count):
    """The `count` aligned-path cases, θ's loads and stores checked vectorised (one quad per access)."""
    out = []
    for name, case in ptx.items():
        if not case.get("ALIGNED", True):
            continue
        w = WIDE[case["OUT"]]
        assert vector_access("ld", w, case["ptx"]), f"{name}: no {w} θ loads"
        assert vector_access("st", w, case["ptx"]), f"{name}: no {w} θ stores"
        out.append((name, case))
    assert len(out) == count
    return out
