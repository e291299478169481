"""Seed logs: a ZO fine-tune as kilobytes (base identity + every noise pass), replayed bit for bit.
docs/seedlog.md describes the .zolog format; `zo-replay` (cli.py) rebuilds a zo-finetune model."""
from .format import FORMAT_VERSION, NOISE_SPEC, SeedLogError
from .model import replay_model
from .replay import Recorder, SeedLog, load_log, read_log, replay_log, weights_sha256

__all__ = ["FORMAT_VERSION", "NOISE_SPEC", "SeedLogError", "Recorder", "SeedLog", "load_log", "read_log",
           "replay_log", "replay_model", "weights_sha256"]
