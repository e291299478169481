// Body of the CPU kernel, compiled once per instruction set: kernel_<isa>.cpp includes every header
// first, then `#pragma GCC target(...)`, then this file inside namespace zo::cpu::<isa>. So no
// #include here, and everything is internal (anonymous namespace): no inline function compiled for
// one instruction set can be merged by the linker into code that runs on another.
//
// The inner loops run over the 16 quads / 64 elements of a block with no branches (selects only),
// so the compiler turns each into SIMD code of the target's width (uint32 lanes for Philox).
// With -ffp-contract=off every instruction set computes the same bits.

namespace {

template <int DT> struct IO;

template <> struct IO<F32> {
  using T = float;
  static ZO_HD float load(float v) { return v; }
  static ZO_HD float nearest(float a) { return a; }
  static ZO_HD float stochastic(float a, uint32_t) { return a; }  // fp32 ignores stochastic rounding
};

template <> struct IO<BF16> {
  using T = uint16_t;
  static ZO_HD float load(uint16_t v) { return bf16_to_float(v); }
  static ZO_HD uint16_t nearest(float a) { return float_to_bf16_rne(a); }
  static ZO_HD uint16_t stochastic(float a, uint32_t w) { return float_to_bf16_sr(a, w); }
};

template <> struct IO<F16> {
  using T = uint16_t;
  static ZO_HD float load(uint16_t v) { return fp16_to_float(v); }
  static ZO_HD uint16_t nearest(float a) { return float_to_fp16_rne(a); }
  static ZO_HD uint16_t stochastic(float a, uint32_t w) { return float_to_fp16_sr(a, w); }
};

// ---------------------------------------------------------------------------------- Philox, 16 quads
// Philox4x32-10 of the 16 quads q .. q+15 (counters (lo32, hi32 of the quad, tid, stream)); word j of
// quad l goes to x_j[l]. philox.h's scalar rounds, in SIMD: each uint32 of the state sits in the low
// half of a 64-bit lane, so vpmuludq gives the full 32x32->64 product in place (lo = the product's low
// half, hi = product >> 32); the high halves carry garbage that vpmuludq and the xors never look at.
// A round is then 6 instructions per vector. The multiply is inline asm: GCC otherwise "simplifies"
// _mm*_mul_epu32 into emulated 64-bit multiplies. (The baseline build auto-vectorises philox.h.)
// The vocabulary of philox_lanes below, once per instruction set: the same names over each one's
// intrinsics. It is the one place where the two builds differ, so the two lists have the same shape on
// purpose (`duplicates` pairs them).
#if defined(ZO_ISA_AVX512)
using V64 = __m512i;  // 8 64-bit lanes
ZO_HD V64 mul_epu32(V64 a, V64 b) {
  V64 r;
  __asm__("vpmuludq %2, %1, %0" : "=v"(r) : "v"(a), "v"(b));
  return r;
}
ZO_HD V64 set1_64(uint64_t v) { return _mm512_set1_epi64((long long)v); }
ZO_HD V64 hi32(V64 a) { return _mm512_srli_epi64(a, 32); }
ZO_HD V64 splat32(uint32_t k) { return _mm512_set1_epi32((int)k); }
ZO_HD V64 xor3(V64 a, V64 b, V64 c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
#elif defined(ZO_ISA_AVX2)
using V64 = __m256i;  // 4 64-bit lanes
ZO_HD V64 mul_epu32(V64 a, V64 b) {
  V64 r;
  __asm__("vpmuludq %2, %1, %0" : "=x"(r) : "x"(a), "x"(b));
  return r;
}
ZO_HD V64 set1_64(uint64_t v) { return _mm256_set1_epi64x((long long)v); }
ZO_HD V64 hi32(V64 a) { return _mm256_srli_epi64(a, 32); }
ZO_HD V64 splat32(uint32_t k) { return _mm256_set1_epi32((int)k); }
ZO_HD V64 xor3(V64 a, V64 b, V64 c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }

// Low halves of the 64-bit lanes of a and b -> 8 uint32 in order.
ZO_HD __m256i pack_lo(__m256i a, __m256i b) {
  const __m256 s = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), 0x88);  // a0 a2 b0 b2 | a4 a6 b4 b6
  return _mm256_permute4x64_epi64(_mm256_castps_si256(s), 0xD8);                             // a0 a2 a4 a6 b0 b2 b4 b6
}
#endif

#if defined(ZO_ISA_AVX512) || defined(ZO_ISA_AVX2)
// Philox4x32-10 of the quads whose indices stand in the 64-bit lanes of qa and qb: word j of each quad's
// output ends in the low half of its lane of a[j] (b[j]). Two independent vectors per round hide the
// multiply latency.
ZO_HD void philox_lanes(V64 qa, V64 qb, uint32_t tid, uint32_t stream, uint32_t k0, uint32_t k1, V64 a[4],
                        V64 b[4]) {
  const V64 m0 = set1_64(PHILOX_M0), m1 = set1_64(PHILOX_M1);
  a[0] = qa;
  b[0] = qb;
  a[1] = hi32(qa);
  b[1] = hi32(qb);
  a[2] = b[2] = set1_64(tid);
  a[3] = b[3] = set1_64(stream);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const V64 key0 = splat32(k0), key1 = splat32(k1);
    const V64 pa0 = mul_epu32(a[0], m0), pa1 = mul_epu32(a[2], m1);
    const V64 pb0 = mul_epu32(b[0], m0), pb1 = mul_epu32(b[2], m1);
    a[0] = xor3(hi32(pa1), a[1], key0);
    b[0] = xor3(hi32(pb1), b[1], key0);
    a[2] = xor3(hi32(pa0), a[3], key1);
    b[2] = xor3(hi32(pb0), b[3], key1);
    a[1] = pa1;
    b[1] = pb1;
    a[3] = pa0;
    b[3] = pb0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
}
#endif

#if defined(ZO_ISA_AVX512)
ZO_HD void philox16(uint64_t q, uint32_t tid, uint32_t stream, uint32_t k0, uint32_t k1, uint32_t* __restrict x0,
                    uint32_t* __restrict x1, uint32_t* __restrict x2, uint32_t* __restrict x3) {
  const V64 qv = set1_64(q);
  V64 a[4], b[4];  // quads q .. q+7, q+8 .. q+15
  philox_lanes(_mm512_add_epi64(qv, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)),
               _mm512_add_epi64(qv, _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15)), tid, stream, k0, k1, a, b);
  uint32_t* const x[4] = {x0, x1, x2, x3};
  for (int j = 0; j < 4; ++j) {
    _mm256_store_si256((__m256i*)x[j], _mm512_cvtepi64_epi32(a[j]));
    _mm256_store_si256((__m256i*)(x[j] + 8), _mm512_cvtepi64_epi32(b[j]));
  }
}
#elif defined(ZO_ISA_AVX2)
ZO_HD void philox16(uint64_t q, uint32_t tid, uint32_t stream, uint32_t k0, uint32_t k1, uint32_t* __restrict x0,
                    uint32_t* __restrict x1, uint32_t* __restrict x2, uint32_t* __restrict x3) {
  const V64 qv = set1_64(q);
  uint32_t* const x[4] = {x0, x1, x2, x3};
  for (int h = 0; h < 2; ++h) {  // quads q + 8h .. q + 8h + 7, as two vectors of four
    V64 a[4], b[4];
    philox_lanes(_mm256_add_epi64(qv, _mm256_setr_epi64x(8 * h, 8 * h + 1, 8 * h + 2, 8 * h + 3)),
                 _mm256_add_epi64(qv, _mm256_setr_epi64x(8 * h + 4, 8 * h + 5, 8 * h + 6, 8 * h + 7)), tid, stream,
                 k0, k1, a, b);
    for (int j = 0; j < 4; ++j) _mm256_store_si256((__m256i*)(x[j] + 8 * h), pack_lo(a[j], b[j]));
  }
}
#else
ZO_HD void philox16(uint64_t q, uint32_t tid, uint32_t stream, uint32_t k0, uint32_t k1, uint32_t* __restrict x0,
                    uint32_t* __restrict x1, uint32_t* __restrict x2, uint32_t* __restrict x3) {
  for (int l = 0; l < QUADS; ++l) quad_words(q + (uint64_t)l, tid, stream, k0, k1, x0[l], x1[l], x2[l], x3[l]);
}
#endif

// Philox words of the block's 16 quads starting at global quad q, in element order (4l + j).
ZO_HD void block_words(uint64_t q, uint32_t tid, uint32_t stream, uint32_t k0, uint32_t k1,
                       uint32_t* __restrict w) {
  alignas(64) uint32_t x0[QUADS], x1[QUADS], x2[QUADS], x3[QUADS];
  philox16(q, tid, stream, k0, k1, x0, x1, x2, x3);
  for (int l = 0; l < QUADS; ++l) {
    w[4 * l + 0] = x0[l];
    w[4 * l + 1] = x1[l];
    w[4 * l + 2] = x2[l];
    w[4 * l + 3] = x3[l];
  }
}

// The 64 normals of the block starting at global quad q.
ZO_HD void block_normals(uint64_t q, uint32_t tid, uint32_t stream, uint32_t k0, uint32_t k1,
                         float* __restrict z) {
  alignas(64) uint32_t x0[QUADS], x1[QUADS], x2[QUADS], x3[QUADS];
  philox16(q, tid, stream, k0, k1, x0, x1, x2, x3);
  for (int l = 0; l < QUADS; ++l) {
    float z0, z1, z2, z3;
    box_muller(x0[l], x1[l], z0, z1);
    box_muller(x2[l], x3[l], z2, z3);
    z[4 * l + 0] = z0;
    z[4 * l + 1] = z1;
    z[4 * l + 2] = z2;
    z[4 * l + 3] = z3;
  }
}

// --------------------------------------------------------------------------- Rademacher signs
// docs/spec.md §9. A 64-element block (from a global quad, so at any multiple of 4) lies in one or two
// 128-element sign blocks. Sign blocks are drawn 16 at a time (one vectorised philox16: 2048 elements) and
// the last run a key drew is kept, so a thread's consecutive blocks cost one Philox call per 128 elements
// and key in SIMD lanes, whatever the tensor's offset.
struct SignRun {
  uint64_t b0;                  // first sign block of the run, a multiple of QUADS (~0: none yet)
  uint32_t k0, k1;              // its key
  alignas(64) uint32_t w[BLOCK];  // word j of sign block b0 + l at w[4 l + j]
};

// Bits 0-63 (lo) and 64-127 (hi) of sign block b.
ZO_HD void sign_block(SignRun& c, uint64_t b, uint32_t tid, uint32_t stream, uint32_t k0, uint32_t k1,
                      uint64_t& lo, uint64_t& hi) {
  const uint64_t b0 = b & ~(uint64_t)(QUADS - 1);
  if (c.b0 != b0 || c.k0 != k0 || c.k1 != k1) {
    block_words(b0, tid, stream, k0, k1, c.w);
    c.b0 = b0;
    c.k0 = k0;
    c.k1 = k1;
  }
  const uint32_t* w = c.w + 4 * (b - b0);
  lo = w[0] | (uint64_t)w[1] << 32;
  hi = w[2] | (uint64_t)w[3] << 32;
}

// The sign bits of elements g .. g+63 (bit e: element g + e).
ZO_HD uint64_t sign_bits64(uint64_t g, uint32_t tid, uint32_t stream, uint32_t k0, uint32_t k1, SignRun& c) {
  const uint64_t b = g >> 7;
  const unsigned r = (unsigned)(g & 127);
  uint64_t lo, hi;
  sign_block(c, b, tid, stream, k0, k1, lo, hi);
  if (r == 0) return lo;
  if (r < 64) return (lo >> r) | (hi << (64 - r));
  if (r == 64) return hi;
  const uint64_t low = hi >> (r - 64);
  sign_block(c, b + 1, tid, stream, k0, k1, lo, hi);
  return low | (lo << (128 - r));
}

// The 64 signs of `bits` as +-1.0f (bit e -> z[e]): shifts and ors only, so it vectorises.
ZO_HD void block_signs(uint64_t bits, float* __restrict z) {
  const uint32_t lo = (uint32_t)bits, hi = (uint32_t)(bits >> 32);
  for (int e = 0; e < 32; ++e) z[e] = sign_float((lo >> e) & 1u);
  for (int e = 0; e < 32; ++e) z[32 + e] = sign_float((hi >> e) & 1u);
}

// The noise of a pass for one thread's run over consecutive blocks of one tensor: normals (§1) or signs
// (§9) of each key. Sign runs are kept per key slot (j mod SLOTS; a slot checks its key, so more keys
// only cost extra Philox calls).
struct BlockNoise {
  static constexpr int SLOTS = 8;
  int form;
  uint32_t tid, stream;
  SignRun slot[SLOTS];

  BlockNoise(int form_, uint32_t tid_, uint32_t stream_) : form(form_), tid(tid_), stream(stream_) {
    for (SignRun& c : slot) c.b0 = ~(uint64_t)0;  // never a multiple of QUADS
  }

  // z of key j (words k0, k1) for the 64 elements of the block at global quad q.
  void block(int j, uint32_t k0, uint32_t k1, uint64_t q, float* __restrict z) {
    if (form == NOISE_RADEMACHER)
      block_signs(sign_bits64(4 * q, tid, stream, k0, k1, slot[j % SLOTS]), z);
    else
      block_normals(q, tid, stream, k0, k1, z);
  }
};

// The scaled form's sigma (storage kind S) of the block whose first element has local index e0 (0 outside
// [0, n)), as float32 into sv.
template <int S>
ZO_HD void load_scale_as(const void* s, int64_t e0, int64_t n, float* __restrict sv) {
  const typename IO<S>::T* v = (const typename IO<S>::T*)s;
  for (int e = 0; e < BLOCK; ++e) {
    const int64_t i = e0 + e;
    sv[e] = (i >= 0 && i < n) ? IO<S>::load(v[i]) : 0.0f;
  }
}

// The task's sigma of the block at e0 into sv (float32 or bfloat16 storage, widened exactly); returns sv, or
// nullptr without a scale (docs/spec.md §10).
ZO_HD const float* load_scale(const Task& t, int64_t e0, float* __restrict sv) {
  if (!t.s) return nullptr;
  if (t.sdt == BF16)
    load_scale_as<BF16>(t.s, e0, t.n, sv);
  else
    load_scale_as<F32>(t.s, e0, t.n, sv);
  return sv;
}

// z of key j for the block, times sigma when the pass is scaled: fmul(sigma, z), the one rounding §10 fixes.
ZO_HD void scaled_block(BlockNoise& nz, int j, uint32_t k0, uint32_t k1, uint64_t q, const float* sv,
                        float* __restrict z) {
  nz.block(j, k0, k1, q, z);
  if (sv)
    for (int e = 0; e < BLOCK; ++e) z[e] = fmul(sv[e], z[e]);
}

// acc[e] += alpha_j z_j[e] for the keys j in order (one z per key; sigma z with a scale sv), in the block at
// global quad q.
ZO_HD void add_key_sum(BlockNoise& nz, const uint32_t* keys, const float* alphas, int K, uint64_t q,
                       float* __restrict acc, const float* sv = nullptr) {
  alignas(64) float z[BLOCK];
  for (int j = 0; j < K; ++j) {
    scaled_block(nz, j, keys[2 * j], keys[2 * j + 1], q, sv, z);
    const float alpha = alphas[j];
    for (int e = 0; e < BLOCK; ++e) acc[e] = fadd(acc[e], fmul(alpha, z[e]));
  }
}

// theta <- gamma theta + sum_j alpha_j z_j + beta dense over blocks [lb0, lb1) of one tensor
// (or, without x, out <- z of keys[0]).
template <int P, int D>
void run_task(const Args& a, const Task& t, int64_t lb0, int64_t lb1) {
  using PT = typename IO<P>::T;
  constexpr int DD = D == NONE ? F32 : D;
  using DT = typename IO<DD>::T;
  PT* p = (PT*)t.p;  // no __restrict: dense may be the parameter itself
  const DT* d = (const DT*)t.d;
  const int64_t n = t.n;
  const int64_t q0 = t.off >> 2;
  const bool sr = a.stochastic && P != F32;
  BlockNoise nz(a.noise, t.tid, a.stream);
  alignas(64) float acc[BLOCK];
  alignas(64) float sv[BLOCK];
  alignas(64) uint32_t w[BLOCK];
  for (int64_t b = lb0; b < lb1; ++b) {
    const uint64_t qb = (uint64_t)(q0 + b * QUADS);
    const int64_t e0 = (int64_t)(qb * 4) - t.off;  // local index of the block's first element
    const bool full = e0 >= 0 && e0 + BLOCK <= n;
    // acc = gamma x
    if (a.has_x) {
      if (full) {
        for (int e = 0; e < BLOCK; ++e) acc[e] = fmul(IO<P>::load(p[e0 + e]), a.gamma);
      } else {
        for (int e = 0; e < BLOCK; ++e) {
          const int64_t i = e0 + e;
          acc[e] = (i >= 0 && i < n) ? fmul(IO<P>::load(p[i]), a.gamma) : 0.0f;
        }
      }
    }
    // acc += alpha_j z_j, keys in order (without x: acc = z of keys[0])
    if (a.has_x)
      add_key_sum(nz, a.keys, a.alphas, a.K, qb, acc, load_scale(t, e0, sv));
    else if (a.K > 0)
      nz.block(0, a.keys[0], a.keys[1], qb, acc);
    // acc += beta dense
    if constexpr (D != NONE) {
      if (full) {
        for (int e = 0; e < BLOCK; ++e) acc[e] = fadd(acc[e], fmul(a.beta, IO<DD>::load(d[e0 + e])));
      } else {
        for (int e = 0; e < BLOCK; ++e) {
          const int64_t i = e0 + e;
          if (i >= 0 && i < n) acc[e] = fadd(acc[e], fmul(a.beta, IO<DD>::load(d[i])));
        }
      }
    }
    // one rounding, store
    if (sr) {
      block_words(qb, t.tid, STREAM_ROUNDING, a.rk0, a.rk1, w);
      if (full) {
        for (int e = 0; e < BLOCK; ++e) p[e0 + e] = IO<P>::stochastic(acc[e], w[e]);
      } else {
        for (int e = 0; e < BLOCK; ++e) {
          const int64_t i = e0 + e;
          if (i >= 0 && i < n) p[i] = IO<P>::stochastic(acc[e], w[e]);
        }
      }
    } else {
      if (full) {
        for (int e = 0; e < BLOCK; ++e) p[e0 + e] = IO<P>::nearest(acc[e]);
      } else {
        for (int e = 0; e < BLOCK; ++e) {
          const int64_t i = e0 + e;
          if (i >= 0 && i < n) p[i] = IO<P>::nearest(acc[e]);
        }
      }
    }
  }
}

// Raw Philox words (testing: the integer layer through the vectorised path).
void run_words(const Args& a, const Task& t, int64_t lb0, int64_t lb1) {
  uint32_t* __restrict p = (uint32_t*)t.p;
  const int64_t q0 = t.off >> 2;
  alignas(64) uint32_t w[BLOCK];
  for (int64_t b = lb0; b < lb1; ++b) {
    const uint64_t qb = (uint64_t)(q0 + b * QUADS);
    const int64_t e0 = (int64_t)(qb * 4) - t.off;
    block_words(qb, t.tid, a.stream, a.keys[0], a.keys[1], w);
    for (int e = 0; e < BLOCK; ++e) {
      const int64_t i = e0 + e;
      if (i >= 0 && i < t.n) p[i] = w[e];
    }
  }
}

// Theta's raw bits of the block whose first element has local index e0 (+0 outside [0, n): residue 0, as
// restore.pack_residues writes partial quads); returns whether the block lies inside the tensor.
template <class B>
ZO_HD bool load_block(const B* __restrict p, int64_t e0, int64_t n, B* __restrict y) {
  const bool full = e0 >= 0 && e0 + BLOCK <= n;
  if (full) {
    for (int e = 0; e < BLOCK; ++e) y[e] = p[e0 + e];
  } else {
    for (int e = 0; e < BLOCK; ++e) {
      const int64_t i = e0 + e;
      y[e] = (i >= 0 && i < n) ? p[i] : (B)0;
    }
  }
  return full;
}

template <class B>
ZO_HD void store_block(B* __restrict p, int64_t e0, int64_t n, bool full, const B* __restrict y) {
  if (full) {
    for (int e = 0; e < BLOCK; ++e) p[e0 + e] = y[e];
  } else {
    for (int e = 0; e < BLOCK; ++e) {
      const int64_t i = e0 + e;
      if (i >= 0 && i < n) p[i] = y[e];
    }
  }
}

// Where a block's exact-form end reads and writes: its plane words lq0 .. lq0+15 (of the tensor's
// `quads`), its stream-2 rounding words (global quad qb), and the pass's mode.
struct BlockEnd {
  uint8_t* plane;
  int64_t lq0, quads;
  int bits;
  int32_t mask, step;  // run-time values on purpose (see restore::invert)
  float gamma;
  bool sr;
  uint64_t qb;
  uint32_t tid, rk0, rk1;
};

// The exact form's end of one block, on theta's bits y (../restore.h), given s_new (sn) and s_undo (su):
// INV: theta0 = invert(y, su [, the plane's residues when PL == 2]); else theta0 = y, and PL == 1 records its
// residues; then y = round(gamma theta0 + sn).
template <int P, bool INV, int PL>
ZO_HD void finish_block(const BlockEnd& x, typename restore::Grid<P>::Bits* __restrict y, const float* __restrict sn,
                        const float* __restrict su) {
  using G = restore::Grid<P>;
  using B = typename G::Bits;
  alignas(64) B th[BLOCK];
  alignas(64) float acc[BLOCK];
  alignas(64) uint32_t w[BLOCK];  // residues, then rounding words
  if constexpr (INV) {
    if constexpr (PL == 2) {
      for (int l = 0; l < QUADS; ++l) {
        const uint32_t word = x.lq0 + l < x.quads ? restore::load_word(x.plane, x.lq0 + l, x.bits) : 0u;
        for (int c = 0; c < 4; ++c) w[4 * l + c] = restore::unpack(word, c, x.bits);
      }
    } else {
      for (int e = 0; e < BLOCK; ++e) w[e] = 0u;  // (mask is 0) one loop for both: it vectorises
    }
    int unsettled = 0;
    for (int e = 0; e < BLOCK; ++e) {
      bool settled;
      th[e] = restore::invert_first<P>(y[e], su[e], w[e], x.mask, x.step, settled);
      unsettled |= (int)!settled;
    }
    if (unsettled)  // rare: the whole search for the block
      for (int e = 0; e < BLOCK; ++e) th[e] = restore::invert<P>(y[e], su[e], w[e], x.mask, x.step);
  } else {
    for (int e = 0; e < BLOCK; ++e) th[e] = y[e];
    if constexpr (PL == 1) {
      for (int e = 0; e < BLOCK; ++e) w[e] = restore::residue<P>(y[e], x.bits);
      for (int l = 0; l < QUADS; ++l)
        if (x.lq0 + l < x.quads)
          restore::store_word(x.plane, x.lq0 + l, x.bits,
                              restore::pack4(w[4 * l], w[4 * l + 1], w[4 * l + 2], w[4 * l + 3], x.bits));
    }
  }
  for (int e = 0; e < BLOCK; ++e) acc[e] = restore::forward(G::to_float(th[e]), x.gamma, sn[e]);
  if (x.sr) {
    block_words(x.qb, x.tid, STREAM_ROUNDING, x.rk0, x.rk1, w);
    for (int e = 0; e < BLOCK; ++e) y[e] = G::stochastic(acc[e], w[e]);
  } else {
    for (int e = 0; e < BLOCK; ++e) y[e] = G::nearest(acc[e]);
  }
}

// body(INV, PL) for a pass's mode, INV and PL as compile-time constants.
template <class Body>
void with_exact_mode(bool invert, int plane_mode, Body&& body) {
  using T = std::true_type;
  using F = std::false_type;
  if (invert) {
    if (plane_mode == 2) return body(T{}, std::integral_constant<int, 2>{});
    return body(T{}, std::integral_constant<int, 0>{});
  }
  if (plane_mode == 1) return body(F{}, std::integral_constant<int, 1>{});
  return body(F{}, std::integral_constant<int, 0>{});
}

// The exact form (../restore.h) over blocks [b0, b1) of one tensor: n elements from global element off,
// theta's bits at p, its residue plane (or nullptr), tensor id tid, under the pass's scalars (A: gamma,
// stochastic, rk0, rk1, invert, plane_mode, plane_bits). Per block: load theta's bits, then
// sums(inv, qb, e0, sn, su) fills s_new and, when inv (a std::bool_constant: some undo != 0), s_undo of
// the block at global quad qb whose first element has local index e0; finish_block; store. Elements
// outside the tensor (the first and last block) load as +0, whose residue is 0: the plane words of
// partial quads get zeros there, as restore.pack_residues writes them.
template <int P, class A, class Sums>
void exact_blocks(const A& a, void* p, uint8_t* plane, int64_t n, int64_t off, uint32_t tid, int64_t b0,
                  int64_t b1, Sums&& sums) {
  with_exact_mode(a.invert, a.plane_mode, [&](auto inv, auto pl) {
    constexpr bool INV = decltype(inv)::value;
    constexpr int PL = decltype(pl)::value;
    using B = typename restore::Grid<P>::Bits;
    B* __restrict bits = (B*)p;
    const int64_t q0 = off >> 2;
    BlockEnd x;
    x.plane = plane;
    x.quads = n ? ((off + n + 3) >> 2) - q0 : 0;  // plane words of the tensor
    x.bits = a.plane_bits;
    restore::invert_params(PL == 2 ? x.bits : 0, x.mask, x.step);
    x.gamma = a.gamma;
    x.sr = a.stochastic && P != restore::F32;
    x.tid = tid;
    x.rk0 = a.rk0;
    x.rk1 = a.rk1;
    alignas(64) B y[BLOCK];
    alignas(64) float sn[BLOCK];
    alignas(64) float su[BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      x.qb = (uint64_t)(q0 + b * QUADS);
      x.lq0 = b * QUADS;                             // plane word of the block's first quad
      const int64_t e0 = (int64_t)(x.qb * 4) - off;  // local index of the block's first element
      const bool full = load_block(bits, e0, n, y);
      sums(inv, x.qb, e0, sn, su);
      finish_block<P, INV, PL>(x, y, sn, su);
      store_block(bits, e0, n, full, y);
    }
  });
}

// The full-rank exact form: s_new and s_undo from one z (sigma z when scaled) per key, from +0 in key order.
template <int P>
void run_exact_dt(const Args& a, const Task& t, int64_t lb0, int64_t lb1) {
  BlockNoise nz(a.noise, t.tid, a.stream);
  exact_blocks<P>(a, t.p, t.plane, t.n, t.off, t.tid, lb0, lb1,
                  [&](auto inv, uint64_t qb, int64_t e0, float* __restrict sn, float* __restrict su) {
    constexpr bool INV = decltype(inv)::value;
    alignas(64) float z[BLOCK];
    alignas(64) float sv[BLOCK];
    const float* scale = load_scale(t, e0, sv);
    for (int e = 0; e < BLOCK; ++e) {
      sn[e] = 0.0f;
      if (INV) su[e] = 0.0f;
    }
    for (int j = 0; j < a.K; ++j) {
      scaled_block(nz, j, a.keys[2 * j], a.keys[2 * j + 1], qb, scale, z);
      const float alpha = a.alphas[j];
      for (int e = 0; e < BLOCK; ++e) sn[e] = restore::sum_step(sn[e], alpha, z[e]);
      if (INV) {
        const float u = a.undo[j];
        for (int e = 0; e < BLOCK; ++e) su[e] = restore::sum_step(su[e], u, z[e]);
      }
    }
  });
}

template <int P>
void run_dense_dt(const Args& a, const Task& t, int64_t lb0, int64_t lb1) {
  switch (t.ddt) {
    case F32: return run_task<P, F32>(a, t, lb0, lb1);
    case BF16: return run_task<P, BF16>(a, t, lb0, lb1);
    case F16: return run_task<P, F16>(a, t, lb0, lb1);
    default: return run_task<P, NONE>(a, t, lb0, lb1);
  }
}

}  // namespace

void run(const Args& a, int64_t b0, int64_t b1) {
  // First task whose blocks reach past b0 (tasks are in block order).
  int lo = 0, hi = a.ntasks - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (a.tasks[mid].first + a.tasks[mid].blocks <= b0) lo = mid + 1; else hi = mid;
  }
  for (int i = lo; i < a.ntasks && a.tasks[i].first < b1; ++i) {
    const Task& t = a.tasks[i];
    const int64_t lb0 = (b0 > t.first ? b0 : t.first) - t.first;
    const int64_t lb1 = (b1 < t.first + t.blocks ? b1 : t.first + t.blocks) - t.first;
    if (lb0 >= lb1) continue;
    if (a.exact) {
      switch (t.pdt) {
        case F32: run_exact_dt<F32>(a, t, lb0, lb1); break;
        case BF16: run_exact_dt<BF16>(a, t, lb0, lb1); break;
        case F16: run_exact_dt<F16>(a, t, lb0, lb1); break;
        default: break;
      }
      continue;
    }
    switch (t.pdt) {
      case F32: run_dense_dt<F32>(a, t, lb0, lb1); break;
      case BF16: run_dense_dt<BF16>(a, t, lb0, lb1); break;
      case F16: run_dense_dt<F16>(a, t, lb0, lb1); break;
      case U32: run_words(a, t, lb0, lb1); break;
      default: break;
    }
  }
}
