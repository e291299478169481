#!/usr/bin/env bash
# The main job: set-up, then zo-finetune with its defaults (all-MiniLM-L6-v2 + label-description head on
# Rotten Tomatoes, 2048/256/512; MeZO vs MeZO-SVRG at equal queries, time to MeZO's peak) -> runs/finetune/.
# Extra arguments go to zo-finetune (e.g. --seeds 0,1,2, --head fresh, --objective accuracy, --out runs/x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec .venv/bin/zo-finetune --out runs/finetune "$@"
