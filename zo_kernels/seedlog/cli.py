"""zo-replay: rebuild a zo-finetune model from the base model and a seed log, bit for bit.

    zo-replay --base MODEL --log runs/x/logs/seed0_mezo.zolog --out tuned/ [--threads N]

Checks the log (format version, length, checksum), rebuilds the initial model from MODEL and the
log's recipe, checks its SHA-256 against the log's, replays every noise pass, checks the final
SHA-256, and only then writes OUT (save_pretrained, safetensors).  Any refusal is one line on
stderr, exit code 2, and nothing written.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .format import SeedLogError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"zo-replay: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zo-replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None,
                   help="the base model zo-finetune started from (directory or hub name; default: the --model "
                        "the log names, or zo-finetune's default model)")
    p.add_argument("--log", required=True, help="a .zolog file written by zo-finetune --save-log")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (the result does not depend on it)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None,
                   help="zo_kernels backend (default: the log's, on the CPU; the best available on a GPU)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from .model import replay_model

    try:
        info = replay_model(a.base, a.log, a.out, threads=a.threads, device=a.device, backend=a.backend,
                            progress=not a.no_progress)
    except SeedLogError as e:
        print(f"zo-replay: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zo-replay: interrupted (nothing written)", file=sys.stderr)
        return 130
    print(f"zo-replay: {info['summary']}; replayed in {info['replay_s']:.2f} s; weights SHA-256 {info['sha256']} "
          f"(matches the log); wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
