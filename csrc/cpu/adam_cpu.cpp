// CPU glue of the fused ZO-Adam pass (zo_kernels.adam; the per-element rule is ../adam.h, the block body
// adam_isa.h): theta, m and v read once and written once per element, z regenerated from the keys,
// nothing weight-sized allocated. Work is cut into blocks of 64 elements counted from each tensor's first
// quad (offset / 4), as in the noise_axpy_ kernel, and at::parallel_for runs over the concatenated
// blocks of all tensors; every value depends only on (key, tensor id, global index).
//
// The body is compiled per instruction set with the full-rank kernel (kernel_<isa>.cpp: baseline, AVX2,
// AVX-512, its vectorised Philox) and the one cpu_isa() selects runs; every build computes the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../adam_args.h"
#include "adam_kernel.h"

namespace zo {
namespace cpu {
namespace {

constexpr int64_t ADAM_GRAIN = 64;  // blocks per parallel chunk at least

AdamFn adam_isa() {
  switch (selected_isa()) {
    case 2: return &avx512::adam_run;
    case 1: return &avx2::adam_run;
    default: return &base::adam_run;
  }
}

// Blocks [b0, b1) of the concatenated block ranges of `tasks`.
void run(AdamFn fn, const AdamPass& a, const std::vector<AdamTask>& tasks, int64_t b0, int64_t b1) {
  for (const AdamTask& t : tasks) {
    const int64_t lo = std::max(b0, t.first), hi = std::min(b1, t.first + t.blocks);
    if (lo < hi) fn(a, t, lo - t.first, hi - t.first);
  }
}

void noise_adam_cpu(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::IntArrayRef keys,
                    at::ArrayRef<double> coeffs, at::ArrayRef<double> scalars, int64_t stochastic,
                    at::IntArrayRef tensor_ids, at::IntArrayRef offsets, int64_t rounding_key, int64_t noise) {
  const AdamCoef coef = check_adam_args(params, exp_avgs, exp_avg_sqs, keys, coeffs, scalars, stochastic,
                                       tensor_ids, offsets, c10::DeviceType::CPU);
  check_noise(noise);
  const size_t n = params.size();
  std::vector<AdamTask> tasks;
  tasks.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    AdamTask t;
    set_adam_fields(t, params, exp_avgs, exp_avg_sqs, tensor_ids, offsets, i);
    t.pdt = dtype_code(params[i].scalar_type());
    t.blocks = (quad_span(t.n, t.off) + ADAM_QUADS - 1) / ADAM_QUADS;
    t.first = total;
    total += t.blocks;
    tasks.push_back(t);
  }
  const KeyTable kt = key_table(keys, coeffs);
  AdamPass a{};
  a.keys = kt.words.data();
  a.coeffs = kt.alphas.data();
  a.K = (int)kt.alphas.size();
  a.c = coef;
  a.stochastic = stochastic != 0;
  a.noise = (int)noise;
  split_key(rounding_key, a.rk0, a.rk1);
  const AdamFn fn = adam_isa();
  at::parallel_for(0, total, ADAM_GRAIN, [&](int64_t b0, int64_t b1) { run(fn, a, tasks, b0, b1); });
}

}  // namespace
}  // namespace cpu
}  // namespace zo

TORCH_LIBRARY_IMPL(zo_kernels, CPU, m) {
  m.impl("_noise_adam_native", &zo::cpu::noise_adam_cpu);
}
