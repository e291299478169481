// zo-noise v1: the one C++ definition, shared by the CPU kernel (host C++) and the CUDA kernel (device code).
//
//   key (64 bit)          k0 = low 32 bits, k1 = high 32 bits
//   counter of element i  (lo32(i / 4), hi32(i / 4), tensor_id, stream)      stream 0: noise, 2: rounding bits,
//                                                                              3 / 4: low-rank U / V
//   Rademacher signs      (stream 5) one counter per 128 elements: see signs4 below (docs/spec.md §9)
//   words                 Philox4x32-10 (Random123; the same function as Triton's tl.philox)
//   uniform               u(x) = ((x >> 9) + 0.5) * 2^-23, in (0, 1), exact in float32
//   normals               Box-Muller on (x0, x1) -> elements 4q, 4q+1 and (x2, x3) -> 4q+2, 4q+3:
//                         r = sqrt(-2 ln u_a), theta = 2 pi u_b, (r cos theta, r sin theta)
//
// zo_kernels/noise.py (PyTorch) is the reference; docs/spec.md section 1 the spec.
//
// Every float operation below is an IEEE add, multiply, sqrt or exact conversion, in a fixed order
// (no library transcendental, no fused multiply-add), so the host and device builds give the same
// bits. On the device the explicit __fadd_rn / __fmul_rn intrinsics keep nvcc from contracting them
// into FMAs; host builds must be compiled with -ffp-contract=off (setup.py does). ln and sin/cos are
// polynomials: ln is the Cephes logf scheme (reduction to [sqrt(1/2), sqrt(2)), about 1 ulp); sin and
// cos take the angle in turns straight from the Philox word, reduce it to [-1/8, 1/8] turn *exactly*
// with integer arithmetic (quadrant k = round(4u)), and evaluate Taylor polynomials of degree 9 / 10
// (truncation error < 3e-9). |z - z_float64| stays within a few float32 ulps, well inside the spec's
// 1e-5 * max(1, |z|).
//
// Everything is branch-free (selects only), so loops over many lanes vectorise on the host.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define ZO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define ZO_HD inline __attribute__((always_inline))
#else
#define ZO_HD inline
#endif

namespace zo {

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;

constexpr uint32_t STREAM_NOISE = 0;
constexpr uint32_t STREAM_ROUNDING = 2;
constexpr uint32_t STREAM_LOWRANK_U = 3;  // low-rank noise: the row factor U (zo_kernels/lowrank.py)
constexpr uint32_t STREAM_LOWRANK_V = 4;  // and the column factor V
constexpr uint32_t STREAM_SIGN = 5;       // Rademacher signs (docs/spec.md §9)

// The noise forms of the native ops' `noise` argument (zo_kernels/native.py NOISE_CODES).
constexpr int NOISE_GAUSSIAN = 0;
constexpr int NOISE_RADEMACHER = 1;

// The Philox stream of a noise form's draws (docs/spec.md §1, §9).
ZO_HD uint32_t noise_stream(int noise) { return noise == NOISE_RADEMACHER ? STREAM_SIGN : STREAM_NOISE; }

// ----------------------------------------------------------------------------- float helpers
ZO_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ZO_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

ZO_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

ZO_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);  // correctly rounded; vectorises with -fno-math-errno
#endif
}

// The bits of one 32-bit type read as another (std::bit_cast before C++20): one register move, on the
// device as on the host.
template <class To, class From>
ZO_HD To bits_as(From x) {
  static_assert(sizeof(To) == 4 && sizeof(From) == 4, "32-bit types only");
  To y;
  memcpy(&y, &x, 4);
  return y;
}

ZO_HD uint32_t f2u(float f) { return bits_as<uint32_t>(f); }
ZO_HD float u2f(uint32_t u) { return bits_as<float>(u); }

// ----------------------------------------------------------------------------- Philox4x32-10
ZO_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  hi = (uint32_t)(p >> 32);
  lo = (uint32_t)p;
#endif
}

ZO_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(PHILOX_M0, c0, hi0, lo0);
  mulhilo32(PHILOX_M1, c2, hi1, lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// In place: the counter (c0..c3) becomes the four output words.
ZO_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
}

// The four words of quad q (elements 4q .. 4q+3) of one tensor and stream.
ZO_HD void quad_words(uint64_t q, uint32_t tensor_id, uint32_t stream, uint32_t k0, uint32_t k1,
                      uint32_t& w0, uint32_t& w1, uint32_t& w2, uint32_t& w3) {
  w0 = (uint32_t)q;
  w1 = (uint32_t)(q >> 32);
  w2 = tensor_id;
  w3 = stream;
  philox4x32_10(w0, w1, w2, w3, k0, k1);
}

// ----------------------------------------------------------------------------- uniforms and normals
ZO_HD float uniform(uint32_t x) {
  // Exact: x >> 9 < 2^23 converts exactly, + 0.5 and * 2^-23 are exact.
  return fmul(fadd((float)(x >> 9), 0.5f), 1.1920928955078125e-07f);
}

// ln(u) for positive normal float32 u (here u in [2^-24, 1)). Cephes logf.
ZO_HD float log_pos(float u) {
  const uint32_t b = f2u(u);
  // u = m 2^e with m in [sqrt(1/2), sqrt(2)): halve m (exponent bits 126 instead of 127) when the
  // mantissa is above sqrt(2) - 1 (0x3504F3 is the mantissa of sqrt(2)).
  const uint32_t mant = b & 0x007FFFFFu;
  const uint32_t big = mant > 0x003504F3u ? 1u : 0u;
  const int32_t e = (int32_t)(b >> 23) - 127 + (int32_t)big;
  const float m = u2f(mant | ((127u - big) << 23));
  const float f = fsub(m, 1.0f);                   // exact (Sterbenz)
  const float fe = (float)e;
  const float f2 = fmul(f, f);
  float p = 7.0376836292e-2f;
  p = fadd(fmul(p, f), -1.1514610310e-1f);
  p = fadd(fmul(p, f), 1.1676998740e-1f);
  p = fadd(fmul(p, f), -1.2420140846e-1f);
  p = fadd(fmul(p, f), 1.4249322787e-1f);
  p = fadd(fmul(p, f), -1.6668057665e-1f);
  p = fadd(fmul(p, f), 2.0000714765e-1f);
  p = fadd(fmul(p, f), -2.4999993993e-1f);
  p = fadd(fmul(p, f), 3.3333331174e-1f);
  float y = fmul(fmul(f, f2), p);
  y = fadd(y, fmul(fe, -2.12194440e-4f));
  y = fadd(y, fmul(-0.5f, f2));
  float r = fadd(f, y);
  return fadd(r, fmul(fe, 0.693359375f));
}

// sin and cos of 2*pi*u(x), u(x) the uniform of word x.
ZO_HD void sincos_2pi_word(uint32_t x, float& s, float& c) {
  // u = (v + 0.5) 2^-23 with v = x >> 9. Quadrant k = round(4u) in 0..4 and the remainder
  // f = u - k/4 in [-1/8, 1/8) are exact: f = ((v - k 2^21) + 0.5) 2^-23.
  const uint32_t v = x >> 9;
  const uint32_t k = (v + (1u << 20)) >> 21;
  const int32_t iv = (int32_t)v - (int32_t)(k << 21);
  const float f = fmul(fadd((float)iv, 0.5f), 1.1920928955078125e-07f);
  const float f2 = fmul(f, f);
  // sin(2 pi f) = f (S1 + f^2 (S3 + ...)),  cos(2 pi f) = 1 + f^2 (C2 + f^2 (C4 + ...))  (Taylor in f)
  float sp = 42.058693944897634f;
  sp = fadd(fmul(sp, f2), -76.70585975306136f);
  sp = fadd(fmul(sp, f2), 81.60524927607504f);
  sp = fadd(fmul(sp, f2), -41.341702240399755f);
  sp = fadd(fmul(sp, f2), 6.283185307179586f);
  sp = fmul(sp, f);
  float cp = -26.426256783374388f;
  cp = fadd(fmul(cp, f2), 60.24464137187664f);
  cp = fadd(fmul(cp, f2), -85.45681720669371f);
  cp = fadd(fmul(cp, f2), 64.93939402266828f);
  cp = fadd(fmul(cp, f2), -19.739208802178716f);
  cp = fadd(fmul(cp, f2), 1.0f);
  // theta = 2 pi f + k pi/2: rotate by the quadrant.
  const bool swap = (k & 1u) != 0;
  const uint32_t s_sign = (k & 2u) << 30;          // sin negated in quadrants 2, 3
  const uint32_t c_sign = ((k + 1u) & 2u) << 30;   // cos negated in quadrants 1, 2
  const float s0 = swap ? cp : sp;
  const float c0 = swap ? sp : cp;
  s = u2f(f2u(s0) ^ s_sign);
  c = u2f(f2u(c0) ^ c_sign);
}

// Box-Muller on one word pair: (r cos theta, r sin theta).
ZO_HD void box_muller(uint32_t xa, uint32_t xb, float& za, float& zb) {
  const float r = fsqrt(fmul(-2.0f, log_pos(uniform(xa))));
  float s, c;
  sincos_2pi_word(xb, s, c);
  za = fmul(r, c);
  zb = fmul(r, s);
}

// The four normals of quad q.
ZO_HD void normals4(uint64_t q, uint32_t tensor_id, uint32_t stream, uint32_t k0, uint32_t k1,
                    float& z0, float& z1, float& z2, float& z3) {
  uint32_t w0, w1, w2, w3;
  quad_words(q, tensor_id, stream, k0, k1, w0, w1, w2, w3);
  box_muller(w0, w1, z0, z1);
  box_muller(w2, w3, z2, z3);
}

// ----------------------------------------------------------------------------- Rademacher signs
// docs/spec.md §9: element i takes bit i mod 128 of sign block b = i / 128, whose 128 bits are the
// Philox words of counter (lo32(b), hi32(b), tensor id, stream) read little-endian (w0 bits 0-31 ...).

// A sign bit (0 or 1) as +1.0f or -1.0f: the bit goes to 1.0f's sign bit.
ZO_HD float sign_float(uint32_t bit) { return u2f(0x3F800000u | (bit << 31)); }

// The four signs of quad q (elements 4q .. 4q+3): bits 4 (q mod 8) .. +3 of word (q mod 32) / 8 of sign
// block q / 32. One Philox call per quad (the GPU kernels: each thread owns quads, and the pass is
// memory-bound); the CPU kernel takes one per sign block instead (cpu/kernel_isa.h). Selects, not an
// indexed array, so the words stay in registers on the device.
ZO_HD void signs4(uint64_t q, uint32_t tensor_id, uint32_t stream, uint32_t k0, uint32_t k1,
                  float& z0, float& z1, float& z2, float& z3) {
  uint32_t w0, w1, w2, w3;
  quad_words(q >> 5, tensor_id, stream, k0, k1, w0, w1, w2, w3);
  const uint32_t sel = (uint32_t)(q >> 3) & 3u;
  const uint32_t word = sel == 0 ? w0 : sel == 1 ? w1 : sel == 2 ? w2 : w3;
  const uint32_t bits = word >> (4u * ((uint32_t)q & 7u));
  z0 = sign_float(bits & 1u);
  z1 = sign_float((bits >> 1) & 1u);
  z2 = sign_float((bits >> 2) & 1u);
  z3 = sign_float((bits >> 3) & 1u);
}

// The noise of quad q in form `noise` (NOISE_GAUSSIAN: normals4, NOISE_RADEMACHER: signs4).
ZO_HD void noise4(int noise, uint64_t q, uint32_t tensor_id, uint32_t stream, uint32_t k0, uint32_t k1,
                  float& z0, float& z1, float& z2, float& z3) {
  if (noise == NOISE_RADEMACHER)
    signs4(q, tensor_id, stream, k0, k1, z0, z1, z2, z3);
  else
    normals4(q, tensor_id, stream, k0, k1, z0, z1, z2, z3);
}

// ----------------------------------------------------------------------------- 16-bit floats
ZO_HD float bf16_to_float(uint16_t h) { return u2f((uint32_t)h << 16); }

// Round to nearest even; NaN -> 0x7FC0 (as PyTorch does).
ZO_HD uint16_t float_to_bf16_rne(float f) {
  const uint32_t b = f2u(f);
  const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return (uint16_t)(nan ? 0x7FC0u : r);
}

// IEEE half -> float, exact (branch-free; the FP16 library's scheme, as in c10::Half).
ZO_HD float fp16_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float normalized = fmul(u2f((two_w >> 4) + exp_offset), 1.92592994438723585e-34f);  // 2^-112
  const float denormalized = fsub(u2f((two_w >> 17) | (126u << 23)), 0.5f);
  const uint32_t denorm_cutoff = 1u << 27;
  const uint32_t result = sign | (two_w < denorm_cutoff ? f2u(denormalized) : f2u(normalized));
  return u2f(result);
}

// float -> IEEE half, round to nearest even (the FP16 library's scheme, as in c10::Half).
ZO_HD uint16_t float_to_fp16_rne(float f) {
  const float scale_to_inf = 5.192296858534827628530496329220096e+33f;  // 2^112
  const float scale_to_zero = 7.703719777548943412223911770339728e-34f;  // 2^-110
  const uint32_t w = f2u(f);
  float base = fmul(fmul(u2f(w & 0x7FFFFFFFu), scale_to_inf), scale_to_zero);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = fadd(u2f((bias >> 1) + 0x07800000u), base);
  const uint32_t bits = f2u(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// ----------------------------------------------------------------------------- stochastic rounding
// zo_kernels.noise.stochastic_round: round float32 x up (away from zero) with probability equal to
// the dropped fraction, using the stream-2 word w of the element.

// bf16: add the top 16 bits of w to the float32 bit pattern and truncate; non-finite -> nearest.
ZO_HD uint16_t float_to_bf16_sr(float x, uint32_t w) {
  const uint32_t b = f2u(x);
  const bool finite = (b & 0x7F800000u) != 0x7F800000u;
  return finite ? (uint16_t)((b + (w >> 16)) >> 16) : float_to_bf16_rne(x);
}

// fp16, normal range: the same with 13 bits. |x| < 2^-14 (fp16 subnormals): the quantum is 2^-24;
// round |x| 2^24 up iff (w >> 8) < its fraction * 2^24. Non-finite -> nearest.
ZO_HD uint16_t float_to_fp16_sr(float x, uint32_t w) {
  const uint32_t b = f2u(x);
  const bool finite = (b & 0x7F800000u) != 0x7F800000u;
  float r = finite ? u2f((b + (w >> 19)) & 0xFFFFE000u) : x;
  const float mag = u2f(b & 0x7FFFFFFFu);
  const bool sub = mag < 6.103515625e-05f;  // 2^-14; false for NaN
  const float scaled = fmul(sub ? mag : 0.0f, 16777216.0f);  // < 2^10 where used: exact
  const float fl = (float)(int32_t)scaled;                     // floor (scaled >= 0)
  const bool up = (float)(w >> 8) < fmul(fsub(scaled, fl), 16777216.0f);
  const float q = fmul(fadd(fl, up ? 1.0f : 0.0f), 5.9604644775390625e-08f);  // 2^-24
  const float sub_r = u2f(f2u(q) | (b & 0x80000000u));
  r = sub ? sub_r : r;
  return float_to_fp16_rne(r);
}

}  // namespace zo
