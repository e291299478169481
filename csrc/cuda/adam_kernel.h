// CUDA kernel of the fused ZO-Adam pass (zo_kernels.adam; per element ../adam.h): host interface
// (no torch; adam_cuda.cpp is the torch glue, adam_kernel.cu the kernel). One launch per param dtype
// covers every tensor of the group through a device table, one Philox call per quad and key.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../adam.h"

namespace zo {
namespace cuda {

struct AdamEntry {
  void* p;             // parameter
  float* m;            // exp_avg (float32)
  float* v;            // exp_avg_sq (float32)
  int64_t n;           // elements
  int64_t off;         // global index of element 0
  int64_t quad_start;  // quads of the earlier tensors of the launch
  uint32_t tid;        // tensor id in the counter
  uint32_t aligned;    // p, m, v aligned to 4 elements and off % 4 == 0: vector loads / stores
};

struct AdamLaunch {
  const AdamEntry* table;  // device: T entries
  int T;
  const uint32_t* keys;    // device: 2 K words
  const float* coeffs;     // device: K
  int K;
  AdamCoef c;
  int pdt;                 // 0 float32, 1 bfloat16, 2 float16 (DType of noise_kernel.h)
  int stochastic;
  uint32_t rk0, rk1;
  int noise;               // NOISE_GAUSSIAN or NOISE_RADEMACHER (../philox.h; docs/spec.md §9)
  int64_t total_quads;
};

cudaError_t launch_adam(const AdamLaunch& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace zo
