// CUDA kernel of the fused ZO-Adam pass (see adam_kernel.h). Only philox.h, adam.h, restore.h and CUDA
// headers: tests/test_nvcc_adam.py checks its PTX. The per-element math is ../adam.h with __fmul_rn /
// __fadd_rn / __fdiv_rn / __fsqrt_rn (no FMA), the same bits as the CPU kernel from the same z.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../adam.h"
#include "../philox.h"
#include "../restore.h"
#include "adam_kernel.h"
#include "quad_pass.cuh"

namespace zo {
namespace cuda {
namespace {

constexpr int ADAM_THREADS = 256;

// One quad per thread (grid-stride): g = sum_j c_j z_j (z of the launch's noise form, noise4), then
// ../adam.h per element; m and v are float32 read and written as their bits (restore::Grid<F32>).
template <int P>
__global__ void __launch_bounds__(ADAM_THREADS) noise_adam_kernel(const AdamLaunch a) {
  using F = restore::Grid<restore::F32>;
  const bool sr = a.stochastic && P != restore::F32;
  const uint32_t stream = noise_stream(a.noise);
  quad::each_quad(a.table, a.T, [&](const AdamEntry& e, const quad::QuadAt& q) {
    uint32_t* __restrict__ m = quad::global((uint32_t*)e.m);
    uint32_t* __restrict__ v = quad::global((uint32_t*)e.v);
    float gr[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < a.K; ++j) {
      float z[4];
      noise4(a.noise, (uint64_t)q.gq, e.tid, stream, a.keys[2 * j], a.keys[2 * j + 1], z[0], z[1], z[2], z[3]);
      const float c = a.coeffs[j];
#pragma unroll
      for (int k = 0; k < 4; ++k) gr[k] = fadd(gr[k], fmul(c, z[k]));
    }
    float th[4], mm[4], vv[4];
    uint32_t mb[4], vb[4];
    quad::load_floats<P>(e.p, q, e.n, th);
    quad::load_quad(m, q, e.n, mb);
    quad::load_quad(v, q, e.n, vb);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      mm[k] = F::to_float(mb[k]);
      vv[k] = F::to_float(vb[k]);
      th[k] = adam_element(th[k], gr[k], mm[k], vv[k], a.c);
      mb[k] = F::nearest(mm[k]);
      vb[k] = F::nearest(vv[k]);
    }
    typename restore::Grid<P>::Bits out[4];
    quad::round_quad<P>(th, sr, (uint64_t)q.gq, e.tid, a.rk0, a.rk1, out);
    quad::store_quad((typename restore::Grid<P>::Bits*)e.p, q, e.n, out);
    quad::store_quad(m, q, e.n, mb);
    quad::store_quad(v, q, e.n, vb);
  });
}

}  // namespace

cudaError_t launch_adam(const AdamLaunch& a, cudaStream_t s) {
  return quad::launch_for_kind(a.pdt, a.total_quads, ADAM_THREADS, [&](auto p, dim3 grid) {
    noise_adam_kernel<decltype(p)::value><<<grid, ADAM_THREADS, 0, s>>>(a);
  });
}

}  // namespace cuda
}  // namespace zo
