"""Checkpoints of a zo-finetune run: one file, DIR/checkpoint.pt, replaced atomically.

The file holds the run's arguments, the results of every finished (seed, method), and the
state of the method in progress (MethodRun.state_dict(): weights, optimizer state_dict, data
order, RNG states, counters, eval history).  It is written to a temporary file in the same
directory, flushed and fsync'ed, then renamed over the old one (os.replace is atomic on POSIX),
so a process killed at any instant leaves either the previous checkpoint or the new one, never a
torn file.  `zo-finetune --resume DIR` reads it back with torch.load(weights_only=True).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import FinetuneError

FILE = "checkpoint.pt"
VERSION = 1


def path(out_dir: str) -> str:
    return os.path.join(out_dir, FILE)


def save(out_dir: str, state: dict) -> None:
    save_file(path(out_dir), dict(state, version=VERSION))


def save_file(final: str, obj) -> None:
    """torch.save to a temporary file beside `final`, fsync, rename over `final`."""
    tmp = f"{final}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load(out_dir: str) -> dict:
    p = path(out_dir)
    if not os.path.isdir(out_dir):
        raise FinetuneError(f"--resume {out_dir}: no such directory")
    if not os.path.isfile(p):
        raise FinetuneError(f"--resume {out_dir}: no {FILE} there (was the run started with --checkpoint-every?)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FinetuneError(f"--resume {out_dir}: cannot read {FILE} ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION or "argv" not in state:
        raise FinetuneError(f"--resume {out_dir}: {FILE} is not a zo-finetune checkpoint of version {VERSION}")
    return state


def remove_stale_temps(out_dir: str) -> None:
    """Temporary files left by a process killed mid-write (never read)."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return
    for n in names:
        if n.startswith(FILE + ".tmp."):
            try:
                os.remove(os.path.join(out_dir, n))
            except OSError:
                pass


def find(out_dir: str) -> Optional[str]:
    p = path(out_dir)
    return p if os.path.isfile(p) else None
