"""Seed logs on a list of named parameters: record a run (`Recorder`), rebuild its weights (`replay_log`).

    opt = MeZO(params, lr=1e-4, record=True)
    rec = Recorder(opt, model.named_parameters(), base={"name": "my-model"})   # before the first step
    ... training ...
    rec.save("run.zolog")

    log = read_log("run.zolog")
    replay_log(fresh_model.named_parameters(), log)    # checks the base hash, replays, checks the final hash

The model side (which model a log starts from, how replayed weights are saved) is model.py.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from ..backends import last_backend
from ..optim.base import _flatten_params
from ..optim.trajectory import replay as _replay
from . import format as fmt
from .format import SeedLogError

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 CPU tensor (any dtype, 0-d too)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def weights_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over the tensors in order: for each, "dtype[shape];" and then its bytes (little-endian)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{_dtype_name(t)}{list(t.shape)};".encode())
        h.update(_raw(t).numpy().tobytes())
    return h.hexdigest()


def _named(named_params) -> List[Tuple[str, torch.Tensor]]:
    out = [(str(n), p) for n, p in named_params]
    if not out:
        raise SeedLogError("no parameters given")
    return out


@dataclass
class SeedLog:
    header: dict
    records: List[dict]
    init: bytes          # raw initial tensors the log carries (header["init_tensors"] says which)
    sha256: str          # of the file
    size: int            # bytes of the file

    @property
    def params(self) -> List[Tuple[str, List[int], str]]:
        return [(str(n), [int(x) for x in s], str(d)) for n, s, d in self.header["params"]]


def load_log(data: bytes) -> SeedLog:
    header, records, init = fmt.decode(data)
    for k in ("params", "init_sha256", "final_sha256", "optimizer", "steps", "base"):
        if k not in header:
            raise SeedLogError(f"malformed log: the header has no {k!r}")
    log = SeedLog(header, records, init, fmt.file_sha256(data), len(data))
    try:
        n = len(log.params)
    except (TypeError, ValueError):
        raise SeedLogError("malformed log: bad parameter list") from None
    for i, r in enumerate(records):
        if any(not 0 <= t < n for t in r["tensor_ids"]):
            raise SeedLogError(f"malformed log: pass {i} names a tensor id outside the {n} parameters")
    return log


def read_log(path: str) -> SeedLog:
    return load_log(fmt.read_bytes(path))


class Recorder:
    """Records a run as a seed log.  Create it before the first step (it hashes the initial weights);
    `encode()` / `save(path)` after the last (it settles a pending lookahead perturbation first).

    named_params: (name, tensor) of the optimizer's parameters in its order (frozen ones too: a
    tensor's noise id is its position).  base: JSON-able identity of the starting model (model.py
    puts zo-finetune's recipe there).  embed: names of tensors whose initial values the log carries
    (a head computed by a forward pass, whose bits another machine's BLAS may not reproduce)."""

    def __init__(self, opt, named_params, base: dict, embed: Sequence[str] = ()):
        if getattr(opt, "trajectory", None) is None:
            raise SeedLogError(f"{type(opt).__name__} does not record its noise passes: build it with record=True")
        named = _named(named_params)
        flat = _flatten_params(opt.param_groups)
        if len(flat) != len(named) or any(p is not q for p, (_, q) in zip(flat, named)):
            raise SeedLogError("named_params must be the optimizer's parameters, in its order")
        unknown = set(embed) - {n for n, _ in named}
        if unknown:
            raise SeedLogError(f"embed names unknown parameters: {', '.join(sorted(unknown))}")
        self.opt, self.named, self.base = opt, named, dict(base)
        self.init_sha256 = weights_sha256(p for _, p in named)
        self.init_tensors, blobs, off = [], [], 0
        for n, p in named:
            if n in embed:
                b = _raw(p).numpy().tobytes()
                self.init_tensors.append([n, _dtype_name(p), list(p.shape), off, len(b)])
                blobs.append(b)
                off += len(b)
        self.init = b"".join(blobs)

    def header(self) -> dict:
        opt = self.opt
        defaults = {k: v for k, v in opt.defaults.items() if isinstance(v, (int, float, str, bool, type(None)))}
        return {"base": self.base, "params": [[n, list(p.shape), _dtype_name(p)] for n, p in self.named],
                "init_sha256": self.init_sha256, "final_sha256": weights_sha256(p for _, p in self.named),
                "init_tensors": self.init_tensors, "steps": int(opt._t),
                "optimizer": {"class": type(opt).__name__, "seed": opt.seed, "defaults": defaults,
                              "options": opt._options(), "rounding": opt.rounding, "restore": opt.restore,
                              "plane_bits": opt.plane_bits, "skipped_steps": opt.skipped_steps},
                "replay": {"backend": opt.backend or last_backend(), "noise": opt.noise}}

    def encode(self) -> bytes:
        self.opt.settle()
        return fmt.encode(self.header(), self.opt.trajectory, self.opt.seed, self.init)

    def save(self, path: str) -> int:
        """Write the log atomically; returns its size in bytes."""
        data = self.encode()
        fmt.write_atomic(path, data)
        return len(data)


def _check_layout(named: List[Tuple[str, torch.Tensor]], log: SeedLog, check_names: bool) -> None:
    want = log.params
    if len(named) != len(want):
        raise SeedLogError(f"base mismatch: the model has {len(named)} trainable tensors, the log {len(want)}")
    for (n, p), (wn, ws, wd) in zip(named, want):
        if list(p.shape) != ws or _dtype_name(p) != wd or (check_names and n != wn):
            raise SeedLogError(f"base mismatch: tensor {n} {_dtype_name(p)}{list(p.shape)} where the log has "
                               f"{wn} {wd}{ws}")


def apply_init_tensors(named: List[Tuple[str, torch.Tensor]], log: SeedLog) -> None:
    """Put the initial values the log carries into their tensors."""
    by_name = dict(named)
    for n, dtype, shape, off, nbytes in log.header.get("init_tensors", []):
        p = by_name.get(n)
        if p is None or _dtype_name(p) != dtype or list(p.shape) != list(shape) or off + nbytes > len(log.init):
            raise SeedLogError(f"base mismatch: the log carries an initial {n} {dtype}{shape} this model cannot take")
        raw = torch.frombuffer(bytearray(log.init[off:off + nbytes]), dtype=torch.uint8)
        with torch.no_grad():
            p.copy_(raw.view(_DTYPES[dtype]).reshape(shape).to(p.device))


def replay_log(named_params, log: SeedLog, *, backend: Optional[str] = None, progress: bool = False,
               check_names: bool = True, check_final: bool = True) -> str:
    """Rebuild a run's final weights in place on `named_params`, which hold the base model's initial
    weights.  Checks the layout and the initial hash first (nothing is changed if they do not match),
    replays every pass, then checks the final hash (check_final=False: report, do not refuse -- for
    a cross-backend comparison).  Returns the final weights' SHA-256."""
    named = _named(named_params)
    _check_layout(named, log, check_names)
    tensors = [p for _, p in named]
    by_name = dict(named)
    saved = [(by_name[e[0]], by_name[e[0]].detach().clone()) for e in log.header.get("init_tensors", [])
             if e[0] in by_name]     # put back if the base does not match: nothing changed
    apply_init_tensors(named, log)
    got = weights_sha256(tensors)
    if got != log.header["init_sha256"]:
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)
        raise SeedLogError(f"base mismatch: the initial weights' SHA-256 is {got[:16]}..., the log was made from "
                           f"{log.header['init_sha256'][:16]}... (a different base model or setup)")
    from tqdm.auto import tqdm

    with tqdm(total=len(log.records), desc="zo-replay", unit="pass", disable=not progress, mininterval=1.0) as bar:
        with torch.no_grad():
            _replay(tensors, log.records, backend=backend, progress=lambda i: bar.update(1))
    final = weights_sha256(tensors)
    if check_final and final != log.header["final_sha256"]:
        raise SeedLogError(f"replay mismatch: the rebuilt weights' SHA-256 is {final[:16]}..., the log's is "
                           f"{log.header['final_sha256'][:16]}... (backend {backend or 'default'})")
    return final
