"""Rank the ZO methods: each tuned over a learning-rate grid, then 3 seeds (zo_kernels.finetune.ranking).

    python scripts/rank.py --out runs/ranking [--methods a,b] [--grid 0.25,0.5,1,2] [--lanes 2] [zo-finetune args]
    python scripts/rank.py --help
"""
import sys

from zo_kernels.finetune.ranking.cli import main

if __name__ == "__main__":
    sys.exit(main())
