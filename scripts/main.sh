#!/usr/bin/env bash
# The main job. Set-up, then the noise benchmark (becomes zo-finetune when it lands).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python benchmarks/bench_noise.py "$@"
