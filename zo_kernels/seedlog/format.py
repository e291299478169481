"""The .zolog file: a ZO fine-tune as its base identity plus every noise pass (docs/seedlog.md).

    magic "ZOSEEDLG" | u16 format version | u64 payload length | payload (xz) | SHA-256 of all before it

The payload is a JSON header (u32 length, then UTF-8) followed by byte streams, one per record
field (columns compress far better than rows): the records are `opt.trajectory`'s dicts, every
noise_axpy_ call on the weights, perturbation and restore passes included -- they round θ too, so
the final weights depend on them.  Keys are stored once, where they first appear, as what they
derive from -- the step key of step s or the key of direction j of step s (s relative to the pass's
step: 0 or 1 almost always) -- else literally; rounding keys as the call index they derive from
(zo_kernels.rounding.step_rounding_key) where they do, else literally.

Reading checks, in order: magic, version, length (truncation), checksum (damage), noise spec,
then the structure; any failure is a SeedLogError with one line.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import tempfile
from typing import Dict, List, Optional, Tuple

from ..noise import step_key
from ..optim.spsa import direction_key
from ..rounding import step_rounding_key

MAGIC = b"ZOSEEDLG"
FORMAT_VERSION = 1
NOISE_SPEC = "zo-noise v1"        # docs/spec.md §1: the noise the keys stand for
_PREFIX = struct.Struct("<8sHQ")   # magic, version, payload length
_DIGEST = 32
_MAX_CALL_INDEX = 64               # rounding keys: call indices tried before storing the key literally
_MAX_DIRECTION = 64                # keys: directions j tried (at the pass's step and the next)
_LITERAL, _STEP_KEY, _DIRECTION_KEY = 0, 1, 2     # key-table entry kinds

# flags byte of a record
_STOCHASTIC, _UNDO, _PLANE_READ, _PLANE_WRITE, _LOWRANK, _RKEY_LITERAL, _RADEMACHER = 1, 2, 4, 8, 16, 32, 64
_KNOWN_FLAGS = 127                 # a reader refuses other bits: a pass it cannot re-issue exactly
STREAMS = ("step", "flags", "nkeys", "keyref", "alpha", "undo", "gamma", "tids", "rkey", "rkey_lit",
           "plane_bits", "lowrank", "keytab", "keylit", "init")


class SeedLogError(ValueError):
    """A log that cannot be used: damaged, truncated, unknown version, or not matching the model."""


# ------------------------------------------------------------------ varints
def _zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def _unzigzag(v: int) -> int:
    return v // 2 if v % 2 == 0 else -(v + 1) // 2


def _put_varint(buf: bytearray, v: int) -> None:
    if v < 0:
        raise ValueError(f"internal: negative varint {v}")
    while v >= 0x80:
        buf.append((v & 0x7F) | 0x80)
        v >>= 7
    buf.append(v)


class _Cursor:
    """Reads one stream; running past its end is a malformed log."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data, self.pos = name, data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise SeedLogError(f"malformed log: stream {self.name!r} ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def varint(self) -> int:
        v, shift = 0, 0
        while True:
            b = self.take(1)[0]
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7
            if shift > 70:
                raise SeedLogError(f"malformed log: bad integer in stream {self.name!r}")

    def f64s(self, n: int) -> List[float]:
        return list(struct.unpack(f"<{n}d", self.take(8 * n)))

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def done(self) -> bool:
        return self.pos == len(self.data)


# ------------------------------------------------------------------ encoding
def encode(header: dict, records: List[dict], seed: int, init: bytes = b"") -> bytes:
    """The file's bytes: `header` (JSON-able; the record tables are added here), the records
    (opt.trajectory's dicts, optimizer seed `seed`) and `init` (raw initial tensors, see the header)."""
    s: Dict[str, bytearray] = {k: bytearray() for k in STREAMS}
    last_step = max((int(r["step"]) for r in records), default=0)
    by_step = {step_key(seed, t): t for t in range(last_step + 2)}   # +1: a lookahead's next step
    keytab: Dict[int, int] = {}
    tid_table: Dict[Tuple[int, ...], int] = {}

    def new_key(k: int, step: int) -> None:
        """The key-table entry of key k, first used by a pass of step `step`."""
        out = s["keytab"]
        if k in by_step:
            _put_varint(out, _STEP_KEY)
            _put_varint(out, _zigzag(by_step[k] - step))
            return
        for t in (step, step + 1):
            j = next((j for j in range(1, _MAX_DIRECTION) if direction_key(seed, t, j) == k), None)
            if j is not None:
                _put_varint(out, _DIRECTION_KEY)
                _put_varint(out, _zigzag(t - step))
                _put_varint(out, j)
                return
        _put_varint(out, _LITERAL)
        s["keylit"] += struct.pack("<Q", k)

    def keyref(k: int, step: int) -> int:
        k = int(k)
        if k not in keytab:
            keytab[k] = len(keytab)
            new_key(k, step)
        return keytab[k]

    prev = 0
    for r in records:
        step = int(r["step"])
        if step < prev:
            raise ValueError(f"internal: trajectory steps go back ({prev} -> {step})")
        _put_varint(s["step"], step - prev)
        prev = step
        keys, alphas = [int(k) for k in r["keys"]], [float(a) for a in r["alphas"]]
        flags = _STOCHASTIC if r.get("rounding", "nearest") == "stochastic" else 0
        undo = r.get("undo")
        if undo is not None:
            flags |= _UNDO | {None: 0, "read": _PLANE_READ, "write": _PLANE_WRITE}[r.get("plane")]
        if r.get("key_v") is not None:
            flags |= _LOWRANK
        noise = r.get("noise", "gaussian")
        if noise not in ("gaussian", "rademacher"):
            raise ValueError(f"internal: noise form {noise!r} has no flag in format {FORMAT_VERSION}")
        if noise == "rademacher":
            flags |= _RADEMACHER
        rkey = int(r["rounding_key"])
        call = next((c for c in range(_MAX_CALL_INDEX) if step_rounding_key(seed, step, c) == rkey), None)
        if call is None:
            flags |= _RKEY_LITERAL
            s["rkey_lit"] += struct.pack("<Q", rkey)
        else:
            _put_varint(s["rkey"], call)
        s["flags"].append(flags)
        _put_varint(s["nkeys"], len(keys))
        for k in keys:
            _put_varint(s["keyref"], keyref(k, step))
        s["alpha"] += struct.pack(f"<{len(alphas)}d", *alphas)
        if undo is not None:
            s["undo"] += struct.pack(f"<{len(keys)}d", *[float(u) for u in undo])
            s["plane_bits"].append(int(r.get("plane_bits", 0)))
        s["gamma"] += struct.pack("<d", float(r["gamma"]))
        tids = tuple(int(t) for t in r["tensor_ids"])
        _put_varint(s["tids"], tid_table.setdefault(tids, len(tid_table)))
        if flags & _LOWRANK:
            _put_varint(s["lowrank"], keyref(r["key_v"], step))
            _put_varint(s["lowrank"], int(r["rank"]))
    s["init"] += init
    head = dict(header, format=FORMAT_VERSION, noise_spec=NOISE_SPEC, seed=int(seed), passes=len(records),
                keys=len(keytab), tensor_id_table=[list(t) for t in tid_table],
                streams=[[k, len(s[k])] for k in STREAMS])
    hj = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    payload = lzma.compress(struct.pack("<I", len(hj)) + hj + b"".join(bytes(s[k]) for k in STREAMS),
                            preset=9 | lzma.PRESET_EXTREME)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(payload)) + payload
    return body + hashlib.sha256(body).digest()


# ------------------------------------------------------------------ decoding
def _check_frame(data: bytes) -> bytes:
    """The payload of a file's bytes, after the magic, version, length and checksum checks."""
    if data[:8] != MAGIC[:len(data)] or (len(data) >= 8 and data[:8] != MAGIC):
        raise SeedLogError("not a .zolog file (it does not start with ZOSEEDLG)")
    if len(data) < _PREFIX.size:
        raise SeedLogError(f"truncated log: {len(data)} bytes")
    _, version, n = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SeedLogError(f"unknown log format version {version} (this zo_kernels reads version {FORMAT_VERSION})")
    want = _PREFIX.size + n + _DIGEST
    if len(data) < want:
        raise SeedLogError(f"truncated log: {len(data)} bytes, the header says {want}")
    if len(data) > want:
        raise SeedLogError(f"damaged log: {len(data) - want} bytes after the end the header gives")
    body = data[:_PREFIX.size + n]
    if hashlib.sha256(body).digest() != data[-_DIGEST:]:
        raise SeedLogError("damaged log: the SHA-256 checksum does not match its contents")
    return body[_PREFIX.size:]


def decode(data: bytes) -> Tuple[dict, List[dict], bytes]:
    """(header, records, init bytes) of a file's bytes; SeedLogError on anything wrong."""
    payload = _check_frame(data)
    try:
        raw = lzma.decompress(payload)
        (hl,) = struct.unpack_from("<I", raw)
        header = json.loads(raw[4:4 + hl].decode())
    except (lzma.LZMAError, struct.error, UnicodeDecodeError, ValueError) as e:
        raise SeedLogError(f"malformed log: the payload does not decode ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise SeedLogError("malformed log: the header is not a JSON object")
    if header.get("noise_spec") != NOISE_SPEC:
        raise SeedLogError(f"unknown noise spec {header.get('noise_spec')!r} (this zo_kernels implements {NOISE_SPEC})")
    try:
        streams, pos = {}, 4 + hl
        for name, n in header["streams"]:
            streams[name] = _Cursor(name, raw[pos:pos + int(n)])
            pos += int(n)
        if pos != len(raw) or set(streams) != set(STREAMS):
            raise SeedLogError("malformed log: the streams do not add up to the payload")
        records = _records(header, streams)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        if isinstance(e, SeedLogError):
            raise
        raise SeedLogError(f"malformed log: {type(e).__name__} in the record tables") from None
    return header, records, streams["init"].data


def _records(header: dict, s: Dict[str, _Cursor]) -> List[dict]:
    seed = int(header["seed"])
    keys: List[int] = []

    def key(step: int, ref: _Cursor) -> int:
        """The key `ref`'s next index names; the next key-table entry when it is the key's first use."""
        i = ref.varint()
        if i < len(keys):
            return keys[i]
        if i > len(keys):
            raise SeedLogError("malformed log: a key is used before it is defined")
        kind, tab = s["keytab"].varint(), s["keytab"]
        if kind == _LITERAL:
            keys.append(s["keylit"].u64())
        elif kind == _STEP_KEY:
            keys.append(step_key(seed, step + _unzigzag(tab.varint())))
        elif kind == _DIRECTION_KEY:
            t = step + _unzigzag(tab.varint())
            keys.append(direction_key(seed, t, tab.varint()))
        else:
            raise SeedLogError(f"malformed log: unknown key kind {kind}")
        return keys[-1]

    tids = [[int(t) for t in ts] for ts in header["tensor_id_table"]]
    out, step = [], 0
    for _ in range(int(header["passes"])):
        step += s["step"].varint()
        flags = s["flags"].take(1)[0]
        if flags & ~_KNOWN_FLAGS:
            raise SeedLogError(f"malformed log: unknown record flags {flags:#x}")
        n = s["nkeys"].varint()
        rec = {"step": step, "keys": [key(step, s["keyref"]) for _ in range(n)], "alphas": s["alpha"].f64s(n),
               "rounding": "stochastic" if flags & _STOCHASTIC else "nearest"}
        if flags & _UNDO:
            rec["undo"] = s["undo"].f64s(n)
            rec["plane"] = "read" if flags & _PLANE_READ else ("write" if flags & _PLANE_WRITE else None)
            rec["plane_bits"] = s["plane_bits"].take(1)[0]
        rec["gamma"] = s["gamma"].f64s(1)[0]
        rec["tensor_ids"] = tids[s["tids"].varint()]
        rec["rounding_key"] = (s["rkey_lit"].u64() if flags & _RKEY_LITERAL
                               else step_rounding_key(seed, step, s["rkey"].varint()))
        if flags & _LOWRANK:
            rec["key_v"] = key(step, s["lowrank"])
            rec["rank"] = s["lowrank"].varint()
        if flags & _RADEMACHER:
            rec["noise"] = "rademacher"
        out.append(rec)
    if len(keys) != int(header["keys"]) or not all(c.done() for name, c in s.items() if name != "init"):
        raise SeedLogError("malformed log: record streams longer than the header's pass count")
    return out


# ------------------------------------------------------------------ files
def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SeedLogError(f"cannot read log {path}: {e.strerror}") from None


def kept_mode(directory: bool = False) -> int:
    """The mode of a file (directory) the user keeps: mkstemp's / mkdtemp's 0600 / 0700 are for the
    temporary only, the kept one gets what the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temp file beside `path` and rename it: a reader never sees half a log."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".zolog", dir=d)
    try:
        os.fchmod(fd, kept_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe(header: dict, n_bytes: Optional[int] = None) -> str:
    """One line about a log (zo-replay prints it)."""
    opt = header.get("optimizer", {})
    size = f", {n_bytes:,} bytes" if n_bytes is not None else ""
    return (f"{opt.get('class', '?')} seed {header.get('seed')}: {header.get('steps')} steps, "
            f"{header.get('passes')} noise passes on {len(header.get('params', []))} tensors{size}")
