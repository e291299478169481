"""Compile the Triton kernel ahead of time for a GPU target, without a GPU.

    python -m zo_kernels.triton.aot OUT_DIR     # writes one .ptx per case, and cases.json

Used by the tests to prove the kernel builds for sm_80/sm_90 and to inspect
its PTX.  Must run in a process without TRITON_INTERPRET: under the
interpreter even triton.language's own helpers are interpreted functions.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

CONSTS = ("K", "HAS_X", "HAS_DENSE", "SR", "OUT", "DENSE", "ALIGNED", "FAST", "BLOCK",
          "EXACT", "INVERT", "PLANE", "PBITS")

# (name, constexprs); dtype names are resolved against triton.language.
CASES = [
    ("k1_fp32", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="float32", DENSE="float32")),
    ("k2_fp32_dense", dict(K=2, HAS_X=True, HAS_DENSE=True, SR=False, OUT="float32", DENSE="float32")),
    ("k4_bf16", dict(K=4, HAS_X=True, HAS_DENSE=False, SR=False, OUT="bfloat16", DENSE="bfloat16")),
    ("k2_bf16_dense_sr", dict(K=2, HAS_X=True, HAS_DENSE=True, SR=True, OUT="bfloat16", DENSE="float32")),
    ("k1_fp16_sr", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=True, OUT="float16", DENSE="float16")),
    ("noise_fp32", dict(K=1, HAS_X=False, HAS_DENSE=False, SR=False, OUT="float32", DENSE="float32")),
    ("k2_fp32_unaligned", dict(K=2, HAS_X=True, HAS_DENSE=True, SR=False, OUT="float32", DENSE="float32",
                               ALIGNED=False)),
    # Exact restore: write the residue plane on +μ; invert (plane-resolved) on the next pass.
    ("exact_bf16_write_plane2", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="bfloat16", DENSE="uint8",
                                     EXACT=True, PLANE=1, PBITS=2)),
    ("exact_bf16_invert_plane8", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="bfloat16", DENSE="int32",
                                      EXACT=True, INVERT=True, PLANE=2, PBITS=8)),
    ("exact_fp32_invert_noplane", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="float32", DENSE="float32",
                                       EXACT=True, INVERT=True)),
    ("k1_fp32_accurate_sincos", dict(K=1, HAS_X=True, HAS_DENSE=False, SR=False, OUT="float32", DENSE="float32",
                                     FAST=False)),
]


def compile_ptx(cc: int, block: int = 256, num_warps: int = 4, **const) -> str:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .noise_axpy import _noise_axpy_kernel

    const = dict(dict(ALIGNED=True, FAST=True, BLOCK=block, EXACT=False, INVERT=False, PLANE=0, PBITS=2), **const)
    for k in ("OUT", "DENSE"):
        const[k] = getattr(tl, const[k])
    sig = {"tab": "*i64", "T": "i32", "gamma": "fp32", "beta": "fp32", "stream": "i32"}
    sig.update({c: "constexpr" for c in CONSTS})
    # The table pointer is 16-byte aligned, as every torch allocation is.
    src = ASTSource(_noise_axpy_kernel, sig, constexprs=const, attrs={(0,): [["tt.divisibility", 16]]})
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": num_warps, "enable_fp_fusion": True})
    return k.asm["ptx"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    out = pathlib.Path(argv[0] if argv else "aot_ptx")
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for cc in (80, 90):
        for name, const in CASES:
            path = out / f"{name}_sm{cc}.ptx"
            path.write_text(compile_ptx(cc, **const))
            index[f"{name}_sm{cc}"] = {"cc": cc, **const, "file": path.name}
    (out / "cases.json").write_text(json.dumps(index, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
