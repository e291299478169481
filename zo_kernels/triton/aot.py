"""Compile the Triton kernel of noise_axpy_ ahead of time for a GPU target, without a GPU.

    python -m zo_kernels.triton.aot OUT_DIR     # writes one .ptx per case, and cases.json

Used by the tests to prove the kernel builds for sm_80/sm_90 and to inspect
its PTX (the cases: noise_axpy.AOT_CASES; helpers.compile_ptx compiles).  Must
run in a process without TRITON_INTERPRET: under the interpreter even
triton.language's own helpers are interpreted functions.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    from .noise_axpy import AOT_CASES, aot_ptx

    out = pathlib.Path(argv[0] if argv else "aot_ptx")
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for cc in (80, 90):
        for name, const in AOT_CASES:
            path = out / f"{name}_sm{cc}.ptx"
            path.write_text(aot_ptx(cc, **const))
            index[f"{name}_sm{cc}"] = {"cc": cc, **const, "file": path.name}
    (out / "cases.json").write_text(json.dumps(index, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
