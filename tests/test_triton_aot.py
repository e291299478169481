"""The Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); its PTX is checked.

Checked: no local-memory traffic (spills, or libdevice's slow sin/cos range
reduction), vectorised global loads and stores on the aligned path, fast
sin/cos, in the ±1 cases (docs/spec.md §9) neither sin/cos nor FMA contraction, and in the scaled cases
(§10) σ loaded vectorised.  Compiled in a
subprocess without TRITON_INTERPRET.
"""
import json

import pytest

from aot_helpers import WIDE, local_memory, run_compiled, vector_access

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    run_compiled(["-m", "zo_kernels.triton.aot", str(out)])
    cases = json.loads((out / "cases.json").read_text())
    return {name: (c, (out / c["file"]).read_text()) for name, c in cases.items()}


def test_every_case_targets_its_architecture(ptx):
    assert len(ptx) == 36
    for name, (case, text) in ptx.items():
        assert f".target sm_{case['cc']}" in text, name


def test_fast_paths_have_no_local_memory_and_vector_access(ptx):
    checked = 0
    for name, (case, text) in ptx.items():
        if not case.get("FAST", True):
            continue
        assert not local_memory(text), f"{name}: local-memory traffic"
        if case.get("RADEMACHER"):
            # the signs need no transcendental; an FMA would round γθ + α·s once, unlike the reference
            assert "sin." not in text and "lg2." not in text and "fma.rn.f32" not in text, name
        else:
            assert "sin.approx" in text and "cos.approx" in text, name
        if case.get("ALIGNED", True):
            w = WIDE[case["OUT"]]
            if case["HAS_X"]:
                assert vector_access("ld", w, text), f"{name}: no {w} loads"
            assert vector_access("st", w, text), f"{name}: no {w} stores"
            checked += 1
    assert checked == 32


def test_fp32_loads_are_128_bit(ptx):
    _, text = ptx["k1_fp32_sm90"]
    assert vector_access("ld", "v4", text)


def test_accurate_sincos_is_why_fast_is_used(ptx):
    """libdevice's accurate sin/cos bring a local-memory range-reduction path (docs/spec.md §1)."""
    _, text = ptx["k1_fp32_accurate_sincos_sm90"]
    assert local_memory(text) and "sin.approx" not in text


def test_scaled_cases_load_sigma_vectorised(ptx):
    """σ is read a quad per load beside θ: a float32 σ in 128-bit loads (with bf16 θ, 64-bit quads, a v4 load can
    only be σ's: an unscaled bf16 case has none), a bfloat16 σ in 64-bit loads (with float32 θ only σ's)."""
    scaled = [n for n, (case, _) in ptx.items() if case.get("SCALED")]
    assert len(scaled) == 8
    for name in scaled:
        assert vector_access("ld", WIDE[ptx[name][0]["SDT"]], ptx[name][1]), name
    assert not vector_access("ld", "v4", ptx["k4_bf16_sm90"][1])
    assert not vector_access("ld", "v2", ptx["k1_fp32_sm90"][1])
