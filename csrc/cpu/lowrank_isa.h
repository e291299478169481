// Body of the low-rank CPU pass (zo_kernels/lowrank.py; lowrank_cpu.cpp is the glue), compiled once per
// instruction set like kernel_isa.h: kernel_<isa>.cpp includes it after kernel_isa.h, inside
// namespace zo::cpu::<isa>, so it shares that file's vectorised Philox (block_normals) and its rules: no
// #include here, everything but the two entry points internal. With -ffp-contract=off every instruction
// set computes the same bits.
//
// The pass runs in blocks of 64 elements aligned to global quads, as the full-rank kernel does, so each
// residue plane word and each quad of stochastic-rounding bits belongs to one block; inside a block the
// elements of one row form a contiguous run whose k-sum vectorises.

namespace {

static_assert(LR_BLOCK == BLOCK, "the low-rank pass shares kernel_isa.h's blocks");

// s[0 .. 64) of the block whose first element has local index e0 (elements outside [0, numel) get 0):
// s[i, j] = sum_k W[i, k] Vt[k, j], from the k = 0 product, k in order.
inline void block_sum(const float* __restrict W, const float* __restrict Vt, int64_t r, int64_t n, int64_t numel,
                      int64_t e0, float* __restrict s) {
  for (int e = 0; e < LR_BLOCK; ++e) s[e] = 0.0f;
  int64_t l = e0 > 0 ? e0 : 0;
  const int64_t end = e0 + LR_BLOCK < numel ? e0 + LR_BLOCK : numel;
  while (l < end) {
    const int64_t i = l / n, j = l - i * n;
    const int64_t len = end - l < n - j ? end - l : n - j;
    float* __restrict out = s + (l - e0);
    const float* __restrict wi = W + i * r;
    const float* __restrict v0 = Vt + j;
    const float w0 = wi[0];
    for (int64_t c = 0; c < len; ++c) out[c] = fmul(w0, v0[c]);
    for (int64_t k = 1; k < r; ++k) {
      const float wk = wi[k];
      const float* __restrict vk = Vt + k * n + j;
      for (int64_t c = 0; c < len; ++c) out[c] = fadd(out[c], fmul(wk, vk[c]));
    }
    l += len;
  }
}

// The pass over blocks [b0, b1) of one tensor: theta0 and the rounding as the full-rank exact form
// (kernel_isa.h's exact_blocks), with s = W Vt (s_undo = Wu Vt when inverting) instead of sum_j alpha_j z_j.
template <int P>
void run_lowrank_dt(const LowrankPass& a, const LowrankTask& t, int64_t b0, int64_t b1) {
  exact_blocks<P>(a, t.p, t.plane, t.numel, t.off, t.tid, b0, b1,
                  [&](auto inv, uint64_t, int64_t e0, float* __restrict sn, float* __restrict su) {
    block_sum(t.w, t.vt, a.rank, t.cols, t.numel, e0, sn);
    if (decltype(inv)::value) block_sum(t.wu, t.vt, a.rank, t.cols, t.numel, e0, su);
  });
}

}  // namespace

void lowrank_normals(const NormalsJob& j, int64_t b0, int64_t b1) {
  alignas(64) float z[LR_BLOCK];
  const int64_t q0 = j.offset >> 2;
  for (int64_t b = b0; b < b1; ++b) {
    const uint64_t qb = (uint64_t)(q0 + b * LR_QUADS);
    const int64_t e0 = (int64_t)(qb * 4) - j.offset;
    block_normals(qb, j.tid, j.stream, j.k0, j.k1, z);
    const int64_t lo = e0 < 0 ? -e0 : 0;
    const int64_t hi = j.count - e0 < LR_BLOCK ? j.count - e0 : LR_BLOCK;
    for (int64_t e = lo; e < hi; ++e) j.out[e0 + e] = z[e];
  }
}

void lowrank_run(const LowrankPass& a, const LowrankTask& t, int64_t b0, int64_t b1) {
  switch (t.pdt) {
    case F32: return run_lowrank_dt<restore::F32>(a, t, b0, b1);
    case BF16: return run_lowrank_dt<restore::BF16>(a, t, b0, b1);
    case F16: return run_lowrank_dt<restore::F16>(a, t, b0, b1);
    default: return;
  }
}
