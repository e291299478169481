// CUDA glue of the fused ZO-Adam pass: checks (../adam_args.h), the device table, one launch per param
// dtype on the current stream; registered for the CUDA dispatch key. Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "../adam_args.h"
#include "adam_kernel.h"
#include "device_table.h"

namespace zo {
namespace cuda {
namespace {

bool aligned16(const void* ptr) { return ((uintptr_t)ptr % 16) == 0; }

void noise_adam_cuda(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::IntArrayRef keys, at::ArrayRef<double> coeffs, at::ArrayRef<double> scalars,
                     int64_t stochastic, at::IntArrayRef tensor_ids, at::IntArrayRef offsets, int64_t rounding_key,
                     int64_t noise) {
  const AdamCoef coef = check_adam_args(params, exp_avgs, exp_avg_sqs, keys, coeffs, scalars, stochastic, tensor_ids,
                                        offsets, c10::DeviceType::CUDA);
  check_noise(noise);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(launch_device(params));
  const KeyTable kt = key_table(keys, coeffs);
  const auto groups = launch_groups(params, [&](size_t i) { return dtype_code(params[i].scalar_type()); });
  for (const auto& kv : groups) {
    const std::vector<size_t>& idx = kv.second;
    const size_t T = idx.size();
    std::vector<AdamEntry> entries(T);
    int64_t quads = 0;
    for (size_t r = 0; r < T; ++r) {
      const size_t i = idx[r];
      AdamEntry e;
      set_adam_fields(e, params, exp_avgs, exp_avg_sqs, tensor_ids, offsets, i);
      e.quad_start = quads;
      e.aligned = (e.off % 4 == 0) && ((uintptr_t)e.p % (4 * params[i].element_size()) == 0) && aligned16(e.m) &&
                  aligned16(e.v);
      entries[r] = e;
      quads += quad_span(e.n, e.off);
    }
    if (quads == 0) continue;
    const DeviceTable table({{entries.data(), T * sizeof(AdamEntry)},
                             {kt.words.data(), kt.words.size() * sizeof(uint32_t)},
                             {kt.alphas.data(), kt.alphas.size() * sizeof(float)}},
                            params[idx[0]].device());
    AdamLaunch a{};
    a.table = table.get<AdamEntry>(0);
    a.T = (int)T;
    a.keys = table.get<uint32_t>(1);
    a.coeffs = table.get<float>(2);
    a.K = (int)keys.size();
    a.c = coef;
    a.pdt = kv.first;
    a.stochastic = (int)stochastic;
    a.noise = (int)noise;
    split_key(rounding_key, a.rk0, a.rk1);
    a.total_quads = quads;
    C10_CUDA_CHECK(launch_adam(a, c10::cuda::getCurrentCUDAStream().stream()));
    // `table` returns to the caching allocator here; its reuse is ordered after the kernel on this stream.
  }
}

}  // namespace
}  // namespace cuda
}  // namespace zo

TORCH_LIBRARY_IMPL(zo_kernels, CUDA, m) {
  m.impl("_noise_adam_native", &zo::cuda::noise_adam_cuda);
}
