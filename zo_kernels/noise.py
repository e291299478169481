"""zo-noise v1 in plain PyTorch: the reference every backend is checked against (docs/spec.md §1;
stochastic rounding: §3; the Rademacher form: §9).

z depends only on (key, tensor id, global element index, stream); see
docs/spec.md §1.  Integer work is done in int64 tensors that
hold uint32 values, so every step is exact; nothing loops over elements.
"""
from __future__ import annotations

import math
import numbers
import struct

import torch

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85

STREAM_NOISE = 0
STREAM_ROUNDING = 2
STREAM_SIGN = 5

# The noise forms of the primitive (docs/spec.md §9): z (§1) or Rademacher signs s (±1).
NOISE_FORMS = ("gaussian", "rademacher")

# Low mantissa bits that rounding fp32 to the target type drops.
DROPPED_BITS = {torch.bfloat16: 16, torch.float16: 13}
FP16_MIN_NORMAL = 2.0 ** -14


# ----------------------------------------------------------------- 64-bit keys
def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def step_key(base_seed: int, step: int) -> int:
    """The 64-bit Philox key of one optimizer step: splitmix64(splitmix64(seed) ^ step)."""
    base_seed, step = check_u64(base_seed, "base_seed"), check_u64(step, "step")
    return splitmix64(splitmix64(base_seed) ^ step)


def check_u64(value, name: str) -> int:
    """`value` as a Python int in [0, 2**64): ints and numpy integers (a seed drawn with numpy) pass;
    bools, floats (even 3.0) and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)      # numpy integers would wrap or turn float in the 64-bit arithmetic
    if not 0 <= value <= M64:
        raise ValueError(f"{name}={value} is outside the unsigned 64-bit range [0, 2**64)")
    return value


def to_signed64(key: int) -> int:
    """Unsigned 64-bit key -> two's complement int64, the form that crosses torch.library."""
    return key - (1 << 64) if key >= (1 << 63) else key


def to_unsigned64(key: int) -> int:
    return key & M64


def mix_keys(*words: int) -> int:
    """A 64-bit key derived from several 64-bit words (order matters)."""
    h = 0
    for w in words:
        h = splitmix64(h ^ (w & M64))
    return h


def float_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


# --------------------------------------------------------------------- Philox
def _mul32(a: int, b: torch.Tensor):
    """(hi32, lo32) of the 64-bit product of constant a and uint32 tensor b, without int64 overflow."""
    bl = b & 0xFFFF
    bh = b >> 16
    x = a * bl  # < 2**48
    y = a * bh  # < 2**48
    lo = x + ((y & 0xFFFF) << 16)  # < 2**49
    hi = ((y >> 16) + (lo >> 32)) & M32
    return hi, lo & M32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Random123 Philox4x32-10 on int64 tensors holding uint32 values (any broadcastable shapes).

    k0, k1 may be Python ints or tensors.  Returns four int64 tensors of uint32 words.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for _ in range(10):
        hi0, lo0 = _mul32(PHILOX_M0, c0)
        hi1, lo1 = _mul32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & M32
        k1 = (k1 + PHILOX_W1) & M32
    return c0, c1, c2, c3


def _quads(key: int, tensor_id: int, numel: int, offset: int, stream: int, device):
    """Philox words of every quad that elements offset .. offset+numel-1 touch, and where element
    `offset` sits in the flattened quads."""
    key = to_unsigned64(key)
    first, last = offset // 4, (offset + numel - 1) // 4
    q = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox4x32_10(q & M32, q >> 32, tensor_id & M32, stream & M32, key & M32, key >> 32)
    return words, offset - 4 * first


def random_words(key: int, tensor_id: int, numel: int, *, offset: int = 0,
                 stream: int = STREAM_ROUNDING, device="cpu") -> torch.Tensor:
    """The raw uint32 word of each element (int64 tensor; stream 2: stochastic-rounding bits)."""
    if numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    words, start = _quads(key, tensor_id, numel, offset, stream, device)
    return torch.stack(words, dim=1).reshape(-1)[start:start + numel]


def uniform(words: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint32 -> (0, 1): ((x >> 9) + 0.5) * 2**-23, exact in float32."""
    return ((words >> 9).to(dtype) + 0.5) * (2.0 ** -23)


def normal(key: int, tensor_id: int, numel: int, *, offset: int = 0, stream: int = STREAM_NOISE,
           dtype=torch.float32, device="cpu") -> torch.Tensor:
    """z for elements offset .. offset+numel-1 of tensor `tensor_id` under `key`.

    Math runs in float32 (as in the kernels) unless dtype is float64, which
    gives the precise values the spec's tolerances are measured against.
    """
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=device)
    (x0, x1, x2, x3), start = _quads(key, tensor_id, numel, offset, stream, device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = []
    for a, b in ((x0, x1), (x2, x3)):
        r = torch.sqrt(-2.0 * torch.log(uniform(a, work)))
        t = (2.0 * math.pi) * uniform(b, work)
        out += [r * torch.cos(t), r * torch.sin(t)]
    return torch.stack(out, dim=1).reshape(-1)[start:start + numel].to(dtype)


def _sign_bits(key: int, tensor_id: int, numel: int, offset: int, stream: int, device) -> torch.Tensor:
    """The sign bit (0: +1, 1: −1) of elements offset .. offset+numel−1 (int64 tensor): block b = i // 128
    is one Philox call on counter (lo32(b), hi32(b), t, stream); element i takes bit i % 32 of word
    (i % 128) // 32."""
    key = to_unsigned64(key)
    first, last = offset // 128, (offset + numel - 1) // 128
    b = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32_10(b & M32, b >> 32, tensor_id & M32, stream & M32, key & M32, key >> 32), dim=1)
    bits = (words[:, :, None] >> torch.arange(32, device=device)) & 1      # [block, word, bit]
    start = offset - 128 * first
    return bits.reshape(-1)[start:start + numel]


def rademacher(key: int, tensor_id: int, numel: int, *, offset: int = 0, stream: int = STREAM_SIGN,
               dtype=torch.float32, device="cpu") -> torch.Tensor:
    """s for elements offset .. offset+numel−1 of tensor `tensor_id` under `key`: ±1, exact in every dtype."""
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=device)
    return (1 - 2 * _sign_bits(key, tensor_id, numel, offset, stream, device)).to(dtype)


def noise_values(noise: str, key: int, tensor_id: int, numel: int, *, offset: int = 0, dtype=torch.float32,
                 device="cpu") -> torch.Tensor:
    """The noise of one key in the form `noise` ("gaussian": z on stream 0, "rademacher": s on stream 5)."""
    if noise == "rademacher":
        return rademacher(key, tensor_id, numel, offset=offset, dtype=dtype, device=device)
    return normal(key, tensor_id, numel, offset=offset, dtype=dtype, device=device)


def default_stream(noise: str) -> int:
    """The stream a form draws from unless told otherwise (noise_'s `stream`)."""
    return STREAM_SIGN if noise == "rademacher" else STREAM_NOISE


# -------------------------------------------------------------------- rounding
def stochastic_round(x: torch.Tensor, dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    """Round float32 `x` to bf16/fp16, up with probability equal to the dropped fraction.

    bf16: add the top 16 bits of the word to the float32 bit pattern, then
    truncate.  fp16 normal range: the same with 13 bits.  fp16 subnormals have
    a fixed quantum 2**-24: round |x|*2**24 up when (word >> 8) < its
    fraction * 2**24.  Non-finite values round to nearest.
    """
    if dtype not in DROPPED_BITS:
        raise ValueError(f"stochastic rounding targets bfloat16 or float16, not {dtype}")
    x = x.to(torch.float32).contiguous()
    drop = DROPPED_BITS[dtype]
    bits = x.view(torch.int32).to(torch.int64) & M32
    finite = (bits & 0x7F800000) != 0x7F800000
    keep_mask = (M32 >> drop) << drop
    rounded_bits = torch.where(finite, (bits + (words >> (32 - drop))) & keep_mask, bits)
    rounded = (rounded_bits - ((rounded_bits >> 31) << 32)).to(torch.int32).view(torch.float32)
    if dtype == torch.float16:
        mag = x.abs()
        scaled = mag * 16777216.0
        floor = torch.floor(scaled)
        up = (words >> 8).to(torch.float32) < (scaled - floor) * 16777216.0
        sub = torch.copysign((floor + up.to(torch.float32)) * (2.0 ** -24), x)
        rounded = torch.where(mag < FP16_MIN_NORMAL, sub, rounded)
        return rounded.to(torch.float16)
    return torch.where(finite, rounded, x).to(dtype)


# --------------------------------------------------- the primitive, reference
def scaled(z: torch.Tensor, scale, i: int) -> torch.Tensor:
    """z of tensor i with the scaled form's σ applied (docs/spec.md §10): σ_i ⊙ z in z's precision, or z
    unchanged without a scale."""
    return z if scale is None else scale[i].reshape(-1).to(z.dtype) * z


def noise_axpy_reference(params, keys, alphas, gamma, dense, beta, rounding, tensor_ids, offsets, rounding_key,
                         noise="gaussian", scale=None):
    """θ_t ← gamma·θ_t + Σ_j alphas[j]·(σ_t ⊙ z(keys[j], t)) + beta·dense_t, fp32 math, one rounding (z: the
    noise form `noise`, docs/spec.md §9; σ: `scale`, one tensor per param, or None for σ = 1, §10).

    float64 parameters are computed in float64 (z and σ too): the precision oracle.

    Arguments are already validated by zo_kernels.ops; keys are unsigned ints.
    """
    for i, p in enumerate(params):
        n, tid, off = p.numel(), tensor_ids[i], offsets[i]
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        acc = p.reshape(-1).to(work) * gamma
        for key, alpha in zip(keys, alphas):
            acc = acc + alpha * scaled(noise_values(noise, key, tid, n, offset=off, dtype=work, device=p.device),
                                       scale, i)
        if dense is not None:
            acc = acc + beta * dense[i].reshape(-1).to(work)
        if rounding == "stochastic" and p.dtype in DROPPED_BITS:
            words = random_words(rounding_key, tid, n, offset=off, device=p.device)
            out = stochastic_round(acc, p.dtype, words)
        else:
            out = acc.to(p.dtype)
        p.copy_(out.view_as(p))


def noise_reference(out, key, tensor_id, offset, stream, noise="gaussian"):
    form = rademacher if noise == "rademacher" else normal
    out.copy_(form(key, tensor_id, out.numel(), offset=offset, stream=stream,
                   device=out.device).view_as(out).to(out.dtype))
