// CUDA kernel of the low-rank pass (zo_kernels/lowrank.py is the reference, csrc/cpu/lowrank_cpu.cpp the
// CPU kernel): host interface, no torch (lowrank_cuda.cpp is the glue, lowrank_kernel.cu the kernels).
//
//   W = sum_j alpha_j U_j (+ beta D),  Wu = sum_j undo_j U_j      (m x r, fp32, from +0, keys in order)
//   s[i, j] = sum_k W[i, k] V[j, k]                                (from W[i,0] V[j,0], k in order)
//   theta0 = invert(theta, s_undo [, plane])  when some undo_j != 0; else the plane records theta's residues
//   theta  = round(gamma theta0 + s)
//
// Two launches per call: the factor kernel writes W (and Wu) and V transposed (r x n) of every tensor
// into one device scratch of sum (m + n) r floats (2m + n with undo), one Philox call per quad of the
// U / V streams; then one pass launch per param dtype reads theta once and writes it once, one quad per
// thread (the exact kernel's layout, so the plane words and stochastic-rounding quads match).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace zo {
namespace cuda {

struct LowrankEntry {
  void* p;              // parameter data
  int64_t n;            // elements
  int64_t cols;         // row length (numel / shape[0])
  int64_t rows;         // shape[0]
  int64_t off;          // global index of element 0 (a multiple of cols: dim-0 shard)
  int64_t quad_start;   // pass quads of the earlier tensors of the launch
  int64_t fquad_start;  // factor quads of the earlier tensors
  uint32_t tid;         // tensor id in the counter
  uint32_t aligned;     // p aligned to 4 elements and off % 4 == 0: vector loads / stores
  uint8_t* plane;       // exact mode: the residue plane, or nullptr
  uint32_t plane_aligned;
  const float* dense;   // beta's U-space term (rows x r, fp32), or nullptr
  float* w;             // scratch: W (rows x r)
  float* wu;            // scratch: Wu (rows x r) when inverting, else nullptr
  float* vt;            // scratch: V transposed (r x cols)
};

struct LowrankLaunch {
  const LowrankEntry* table;  // device: T entries
  int T;
  const uint32_t* keys;       // device: 2 K words of the U keys
  const float* alphas;        // device: K
  const float* undo;          // device: K, or nullptr (no inversion)
  int K;
  uint32_t kv0, kv1;          // the V key
  int rank;
  float gamma;
  float beta;
  int pdt;                    // DType (noise_kernel.h) of every p of a pass launch
  int stochastic;
  uint32_t rk0, rk1;          // rounding key
  int invert;                 // some undo != 0
  int plane_mode;             // 0: no planes, 1: write residues, 2: read them
  int plane_bits;
  int64_t total_quads;        // pass quads of the launch's tensors
  int64_t total_fquads;       // factor quads of every tensor of the call
};

// The factor kernel over every tensor of `args.table`.
cudaError_t launch_lowrank_factors(const LowrankLaunch& args, cudaStream_t stream);
// The pass over the tensors of `args.table` (all of dtype args.pdt); the factors must be written.
cudaError_t launch_lowrank_pass(const LowrankLaunch& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace zo
