"""zo-replay: rebuild a zo-finetune model from the base model and a seed log, bit for bit.

    zo-replay --base MODEL --log runs/x/logs/seed0_mezo.zolog --out tuned/ [--threads N]

Checks the log (format version, length, checksum), rebuilds the initial model from MODEL and the
log's recipe, checks its SHA-256 against the log's, replays every noise pass, checks the final
SHA-256, and only then writes OUT (save_pretrained, safetensors).  Any refusal is one line on
stderr, exit code 2, and nothing written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .format import SeedLogError, describe


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


def replay_model(base: Optional[str], log_path: str, out: str, *, threads: Optional[int] = None, device: str = "cpu",
                 backend: Optional[str] = None, progress: bool = True) -> dict:
    """zo-replay as a function: returns {"sha256", "steps", "passes", "replay_s", ...}; SeedLogError on refusal."""
    import torch

    from . import model
    from .replay import read_log, replay_log

    if threads is not None:
        if threads < 1:
            raise SeedLogError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SeedLogError(f"--device {device}: no CUDA GPU is available here")
    log = read_log(log_path)
    model.check_out(out)
    if backend is None and device == "cpu":
        backend = log.header["replay"].get("backend")
        if backend not in ("cpu", "reference"):
            backend = None
    net, tok, named = model.rebuild(base, log.header["base"], device)
    t0 = time.perf_counter()
    sha = replay_log(named, log, backend=backend, progress=progress)
    dt = time.perf_counter() - t0
    info = {"log": os.path.abspath(log_path), "log_sha256": log.sha256, "sha256": sha, "steps": log.header["steps"],
            "passes": len(log.records), "replay_s": dt, "backend": backend, "device": device,
            "optimizer": log.header["optimizer"], "base": log.header["base"]}
    model.save(net, tok, log.header["base"], out, info)
    info["summary"] = describe(log.header, log.size)
    return info


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
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
