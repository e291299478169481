#!/usr/bin/env bash
# The main job: set-up, then zo-finetune with its defaults (all-MiniLM-L6-v2 + fresh 2-class head on
# Rotten Tomatoes, 512/256/256; MeZO vs MeZO-SVRG at equal queries, FO-SGD) -> runs/finetune/.
# Extra arguments go to zo-finetune (e.g. --methods mezo,mezo-svrg --out runs/x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec .venv/bin/zo-finetune --out runs/finetune "$@"
