// CPU kernel of the fused ZO-Adam pass (zo_kernels.adam; the per-element rule is ../adam.h):
// theta, m and v read once and written once per element, z regenerated from the keys, nothing
// weight-sized allocated. Work is cut into blocks of 64 elements counted from each tensor's first
// quad (offset / 4), as in the noise_axpy_ kernel, and at::parallel_for runs over the concatenated
// blocks of all tensors; every value depends only on (key, tensor id, global index).
//
// Compiled for the build's baseline instruction set only: z comes from philox.h's scalar functions
// (which auto-vectorise), not the hand-written AVX2/AVX-512 Philox of kernel_isa.h. Same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../adam.h"
#include "../adam_args.h"
#include "../philox.h"

namespace zo {
namespace cpu {
namespace {

constexpr int ADAM_QUADS = 16;
constexpr int ADAM_BLOCK = 4 * ADAM_QUADS;
constexpr int64_t ADAM_GRAIN = 64;  // blocks per parallel chunk at least

enum AdamDType : int { A_F32 = 0, A_BF16 = 1, A_F16 = 2 };

struct AdamTask {
  void* p;
  float* m;
  float* v;
  int64_t n, off, first, blocks;
  uint32_t tid;
  int pdt;
};

struct AdamArgs {
  const AdamTask* tasks;
  int ntasks;
  const uint32_t* keys;  // 2 K words
  const float* coeffs;   // K
  int K;
  AdamCoef c;
  bool stochastic;
  uint32_t rk0, rk1;
};

inline float load_p(const void* p, int dt, int64_t i) {
  if (dt == A_F32) return ((const float*)p)[i];
  if (dt == A_BF16) return bf16_to_float(((const uint16_t*)p)[i]);
  return fp16_to_float(((const uint16_t*)p)[i]);
}

inline void store_p(void* p, int dt, int64_t i, float x, bool sr, uint32_t w) {
  if (dt == A_F32) {
    ((float*)p)[i] = x;
  } else if (dt == A_BF16) {
    ((uint16_t*)p)[i] = sr ? float_to_bf16_sr(x, w) : float_to_bf16_rne(x);
  } else {
    ((uint16_t*)p)[i] = sr ? float_to_fp16_sr(x, w) : float_to_fp16_rne(x);
  }
}

void run_block(const AdamArgs& a, const AdamTask& t, int64_t b) {
  const uint64_t qb = (uint64_t)((t.off >> 2) + b * ADAM_QUADS);
  const int64_t e0 = (int64_t)(qb * 4) - t.off;  // local index of the block's first element
  alignas(64) float g[ADAM_BLOCK];
  alignas(64) float z[ADAM_BLOCK];
  for (int e = 0; e < ADAM_BLOCK; ++e) g[e] = 0.0f;
  for (int j = 0; j < a.K; ++j) {
    const uint32_t k0 = a.keys[2 * j], k1 = a.keys[2 * j + 1];
    for (int l = 0; l < ADAM_QUADS; ++l)
      normals4(qb + (uint64_t)l, t.tid, STREAM_NOISE, k0, k1, z[4 * l], z[4 * l + 1], z[4 * l + 2], z[4 * l + 3]);
    const float c = a.coeffs[j];
    for (int e = 0; e < ADAM_BLOCK; ++e) g[e] = fadd(g[e], fmul(c, z[e]));
  }
  const bool sr = a.stochastic && t.pdt != A_F32;
  uint32_t w[ADAM_BLOCK];
  if (sr)
    for (int l = 0; l < ADAM_QUADS; ++l)
      quad_words(qb + (uint64_t)l, t.tid, STREAM_ROUNDING, a.rk0, a.rk1, w[4 * l], w[4 * l + 1], w[4 * l + 2],
                 w[4 * l + 3]);
  for (int e = 0; e < ADAM_BLOCK; ++e) {
    const int64_t i = e0 + e;
    if (i < 0 || i >= t.n) continue;
    float m = t.m[i], v = t.v[i];
    const float th = adam_element(load_p(t.p, t.pdt, i), g[e], m, v, a.c);
    t.m[i] = m;
    t.v[i] = v;
    store_p(t.p, t.pdt, i, th, sr, sr ? w[e] : 0u);
  }
}

void run(const AdamArgs& a, int64_t b0, int64_t b1) {
  for (int i = 0; i < a.ntasks; ++i) {
    const AdamTask& t = a.tasks[i];
    const int64_t lo = std::max(b0, t.first), hi = std::min(b1, t.first + t.blocks);
    for (int64_t b = lo; b < hi; ++b) run_block(a, t, b - t.first);
  }
}

void noise_adam_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::IntArrayRef keys,
                    at::ArrayRef<double> coeffs, at::ArrayRef<double> scalars, int64_t stochastic,
                    at::IntArrayRef tensor_ids, at::IntArrayRef offsets, int64_t rounding_key) {
  const AdamCoef coef = check_adam_args(params, exp_avgs, exp_avg_sqs, keys, coeffs, scalars, stochastic,
                                       tensor_ids, offsets, c10::DeviceType::CPU);
  const size_t n = params.size();
  std::vector<AdamTask> tasks;
  tasks.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    AdamTask t;
    t.p = params[i].data_ptr();
    t.m = exp_avgs[i].data_ptr<float>();
    t.v = exp_avg_sqs[i].data_ptr<float>();
    t.n = params[i].numel();
    t.off = offsets[i];
    t.tid = (uint32_t)tensor_ids[i];
    t.pdt = dtype_code(params[i].scalar_type());
    const int64_t quads = t.n ? (t.off + t.n + 3) / 4 - t.off / 4 : 0;
    t.blocks = (quads + ADAM_QUADS - 1) / ADAM_QUADS;
    t.first = total;
    total += t.blocks;
    tasks.push_back(t);
  }
  const KeyTable kt = key_table(keys, coeffs);
  AdamArgs a{};
  a.tasks = tasks.data();
  a.ntasks = (int)n;
  a.keys = kt.words.data();
  a.coeffs = kt.alphas.data();
  a.K = (int)kt.alphas.size();
  a.c = coef;
  a.stochastic = stochastic != 0;
  split_key(rounding_key, a.rk0, a.rk1);
  at::parallel_for(0, total, ADAM_GRAIN, [&](int64_t b0, int64_t b1_) { run(a, b0, b1_); });
}

}  // namespace
}  // namespace cpu
}  // namespace zo

TORCH_LIBRARY_IMPL(zo_kernels, CPU, m) {
  m.impl("_noise_adam_native", &zo::cpu::noise_adam_cpu);
}
