// Body of the fused ZO-Adam CPU pass (zo_kernels/adam.py; the per-element rule is ../adam.h; adam_cpu.cpp
// is the glue), compiled once per instruction set like kernel_isa.h: kernel_<isa>.cpp includes it after
// kernel_isa.h, inside namespace zo::cpu::<isa>, so z comes from that file's vectorised Philox
// (block_normals) and theta's stochastic-rounding words from block_words. No #include here, everything but
// the entry point internal. With -ffp-contract=off every instruction set computes the same bits: the same
// IEEE adds, multiplies, divides and square roots (sqrtps is correctly rounded) in the same order.
//
// Per block of 64 elements (aligned to global quads, as the full-rank kernel's blocks): g = sum_j c_j z_j
// (z: normals, or the signs of docs/spec.md §9 when AdamPass::noise says so) from +0 in key order, then
// theta, m and v loaded once, updated by adam_element and stored once.

namespace {

static_assert(ADAM_BLOCK == BLOCK, "the Adam pass shares kernel_isa.h's blocks");

template <int P>
void run_adam_blocks(const AdamPass& a, const AdamTask& t, int64_t lb0, int64_t lb1) {
  using PT = typename IO<P>::T;
  PT* __restrict p = (PT*)t.p;
  const int64_t n = t.n;
  const int64_t q0 = t.off >> 2;
  const bool sr = a.stochastic && P != F32;
  alignas(64) PT y[BLOCK];
  alignas(64) float g[BLOCK];     // the gradient, then theta in fp32
  alignas(64) float m[BLOCK], v[BLOCK];
  alignas(64) uint32_t w[BLOCK];
  BlockNoise nz(a.noise, t.tid, noise_stream(a.noise));
  for (int64_t b = lb0; b < lb1; ++b) {
    const uint64_t qb = (uint64_t)(q0 + b * QUADS);
    for (int e = 0; e < BLOCK; ++e) g[e] = 0.0f;
    add_key_sum(nz, a.keys, a.coeffs, a.K, qb, g);
    // Outside [0, n) (a tensor's first and last block) everything loads as +0 and is never stored.
    const int64_t e0 = (int64_t)(qb * 4) - t.off;  // local index of the block's first element
    const bool full = load_block(p, e0, n, y);
    load_block(t.m, e0, n, m);
    load_block(t.v, e0, n, v);
    for (int e = 0; e < BLOCK; ++e) g[e] = adam_element(IO<P>::load(y[e]), g[e], m[e], v[e], a.c);
    if (sr) {
      block_words(qb, t.tid, STREAM_ROUNDING, a.rk0, a.rk1, w);
      for (int e = 0; e < BLOCK; ++e) y[e] = IO<P>::stochastic(g[e], w[e]);
    } else {
      for (int e = 0; e < BLOCK; ++e) y[e] = IO<P>::nearest(g[e]);
    }
    store_block(p, e0, n, full, y);
    store_block(t.m, e0, n, full, m);
    store_block(t.v, e0, n, full, v);
  }
}

}  // namespace

void adam_run(const AdamPass& a, const AdamTask& t, int64_t b0, int64_t b1) {
  switch (t.pdt) {
    case F32: return run_adam_blocks<F32>(a, t, b0, b1);
    case BF16: return run_adam_blocks<BF16>(a, t, b0, b1);
    case F16: return run_adam_blocks<F16>(a, t, b0, b1);
    default: return;
  }
}
