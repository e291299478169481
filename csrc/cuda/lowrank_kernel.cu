// CUDA kernels of the low-rank pass (see lowrank_kernel.h). Only philox.h, restore.h and CUDA headers:
// tests/test_nvcc_lowrank.py checks their PTX. The float math is the CPU kernel's (csrc/cpu/lowrank_cpu.cpp)
// operation for operation with __fmul_rn / __fadd_rn (never contracted into FMAs), so from the same keys
// both kernels compute the same bits.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../philox.h"
#include "../restore.h"
#include "lowrank_kernel.h"
#include "noise_kernel.h"
#include "quad_pass.cuh"

namespace zo {
namespace cuda {
namespace {

constexpr int LR_THREADS = 256;

// Quads of the U stream a tensor's rows cover (global indices row0 r .. (row0 + rows) r).
__device__ __forceinline__ int64_t u_quads(const LowrankEntry& e, int r, int64_t& u0) {
  const int64_t row0 = e.cols ? e.off / e.cols : 0;
  u0 = row0 * r;
  return e.rows ? ((u0 + e.rows * r + 3) >> 2) - (u0 >> 2) : 0;
}

// W (and Wu) from the U keys, and V transposed, of every tensor: one quad of the U or V stream per
// thread (grid-stride over the tensors' concatenated factor quads).
__global__ void __launch_bounds__(LR_THREADS) lowrank_factor_kernel(const LowrankLaunch a) {
  const int64_t S = (int64_t)gridDim.x * blockDim.x;
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int r = a.rank;
  for (int t = 0; t < a.T; ++t) {
    const LowrankEntry e = a.table[t];
    if (e.n == 0) continue;
    int64_t u0;
    const int64_t uq = u_quads(e, r, u0);
    const int64_t mr = e.rows * r, nr = e.cols * r;
    const int64_t nq = uq + ((nr + 3) >> 2);
    for (int64_t i = quad::first_quad(g, S, e.fquad_start); i < nq; i += S) {
      if (i < uq) {  // W, Wu: local factor element u = 4 gq + c - u0
        const int64_t gq = (u0 >> 2) + i;
        float w[4], wu[4];
        quad::key_sums(NOISE_GAUSSIAN, (uint64_t)gq, e.tid, STREAM_LOWRANK_U, a.K, a.keys, a.alphas,
                       e.wu ? a.undo : nullptr, w, wu);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t k = gq * 4 + c - u0;
          if (k < 0 || k >= mr) continue;
          quad::global(e.w)[k] = e.dense ? restore::sum_step(w[c], a.beta, quad::global(e.dense)[k]) : w[c];
          if (e.wu) quad::global(e.wu)[k] = wu[c];
        }
      } else {  // V[jj, kk] = z(key_v, t, jj r + kk, stream 4), stored at vt[kk cols + jj]
        const int64_t gq = i - uq;
        float z[4];
        normals4((uint64_t)gq, e.tid, STREAM_LOWRANK_V, a.kv0, a.kv1, z[0], z[1], z[2], z[3]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t k = gq * 4 + c;
          if (k >= nr) continue;
          const int64_t jj = k / r;
          quad::global(e.vt)[(k - jj * r) * e.cols + jj] = z[c];
        }
      }
    }
  }
}

// s = sum_k W[i, k] V[j, k] (and s_undo from Wu) for element (i, j): from the k = 0 product, k in order.
__device__ __forceinline__ void row_dot(const LowrankEntry& e, int r, int64_t i, int64_t j, float& s, float& su) {
  const float* __restrict__ wi = quad::global(e.w) + i * r;
  const float* __restrict__ vj = quad::global(e.vt) + j;
  if (e.wu) {
    const float* __restrict__ ui = quad::global(e.wu) + i * r;
    s = fmul(wi[0], vj[0]);
    su = fmul(ui[0], vj[0]);
    for (int k = 1; k < r; ++k) {
      const float v = vj[k * e.cols];
      s = fadd(s, fmul(wi[k], v));
      su = fadd(su, fmul(ui[k], v));
    }
    return;
  }
  s = fmul(wi[0], vj[0]);
  for (int k = 1; k < r; ++k) s = fadd(s, fmul(wi[k], vj[k * e.cols]));
}

// The pass, one quad per thread (grid-stride), every tensor of the launch of param dtype P.
template <int P>
__global__ void __launch_bounds__(LR_THREADS) lowrank_pass_kernel(const LowrankLaunch a) {
  quad::exact_pass<P>(a, [&](const LowrankEntry& e, int64_t, int64_t e0, float sn[4], float su[4]) {
    // (row, col) of the quad's first element inside the tensor, then stepped along the row
    const int64_t first = e0 < 0 ? 0 : e0;
    int64_t row = first / e.cols, col = first - row * e.cols;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      sn[c] = su[c] = 0.0f;
      const int64_t l = e0 + c;
      if (l < 0 || l >= e.n) continue;
      row_dot(e, a.rank, row, col, sn[c], su[c]);
      if (++col == e.cols) {
        col = 0;
        ++row;
      }
    }
  });
}

}  // namespace

cudaError_t launch_lowrank_factors(const LowrankLaunch& a, cudaStream_t s) {
  return quad::launch_quads(a.total_fquads, LR_THREADS,
                            [&](dim3 grid) { lowrank_factor_kernel<<<grid, LR_THREADS, 0, s>>>(a); });
}

cudaError_t launch_lowrank_pass(const LowrankLaunch& a, cudaStream_t s) {
  return quad::launch_for_kind(a.pdt, a.total_quads, LR_THREADS, [&](auto p, dim3 grid) {
    lowrank_pass_kernel<decltype(p)::value><<<grid, LR_THREADS, 0, s>>>(a);
  });
}

}  // namespace cuda
}  // namespace zo
