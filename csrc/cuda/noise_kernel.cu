// CUDA kernels of the primitive (see noise_kernel.h). Only philox.h and CUDA headers: no torch, so
// nvcc compiles this quickly and tests can check its PTX (tests/test_nvcc_compile.py).
//
// zo-noise v1 and the rounding rules come from csrc/philox.h, the same code as the CPU kernel; its
// float math uses __fmul_rn / __fadd_rn (never contracted into FMAs), so the CUDA kernel computes
// the same bits as the CPU kernel.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../philox.h"
#include "../restore.h"
#include "noise_kernel.h"
#include "quad_pass.cuh"

namespace zo {
namespace cuda {
namespace {

constexpr int THREADS = 256;

// The scaled form's sigma of the quad as float32 (float32 or bfloat16 storage, widened exactly; docs/spec.md §10).
__device__ __forceinline__ void load_sigma(const Entry& e, const quad::QuadAt& q, float sv[4]) {
  if (e.sdt == BF16)
    quad::load_floats<BF16>(e.s, q, e.n, sv);
  else
    quad::load_floats<F32>(e.s, q, e.n, sv);
}

// theta <- gamma theta + sum_j alpha_j z_j + beta dense (or out <- z of keys[0] when !has_x; z_j times sigma
// when the row has the scaled form's e.s, docs/spec.md §10), theta and
// dense of storage kinds P and D (restore::Grid; D == NONE: no dense term); z of the launch's noise form
// (noise4: normals, or the signs of docs/spec.md §9).
template <int P, int D>
__global__ void __launch_bounds__(THREADS) noise_axpy_kernel(const LaunchArgs a) {
  const bool sr = a.stochastic && P != F32;
  quad::each_quad(a.table, a.T, [&](const Entry& e, const quad::QuadAt& q) {
    float acc[4];
    if (a.has_x) {
      float x[4];
      quad::load_floats<P>(e.p, q, e.n, x);  // dense may be the parameter itself: nothing is __restrict__
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[c] = fmul(x[c], a.gamma);
      float sv[4];
      if (e.s) load_sigma(e, q, sv);  // the scaled form (docs/spec.md §10)
      for (int j = 0; j < a.K; ++j) {
        float z[4];
        noise4(a.noise, (uint64_t)q.gq, e.tid, a.stream, a.keys[2 * j], a.keys[2 * j + 1], z[0], z[1], z[2], z[3]);
        if (e.s) {
#pragma unroll
          for (int c = 0; c < 4; ++c) z[c] = fmul(sv[c], z[c]);
        }
        const float alpha = a.alphas[j];
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[c] = fadd(acc[c], fmul(alpha, z[c]));
      }
    } else {
      noise4(a.noise, (uint64_t)q.gq, e.tid, a.stream, a.keys[0], a.keys[1], acc[0], acc[1], acc[2], acc[3]);
    }
    if constexpr (D != NONE) {
      float y[4];
      quad::load_floats<D>(e.d, q, e.n, y);
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[c] = fadd(acc[c], fmul(a.beta, y[c]));
    }
    typename restore::Grid<P>::Bits out[4];
    quad::round_quad<P>(acc, sr, (uint64_t)q.gq, e.tid, a.rk0, a.rk1, out);
    quad::store_quad((typename restore::Grid<P>::Bits*)e.p, q, e.n, out);
  });
}

// Raw Philox words of keys[0] (the integer layer; tests).
__global__ void __launch_bounds__(THREADS) noise_words_kernel(const LaunchArgs a) {
  quad::each_quad(a.table, a.T, [&](const Entry& e, const quad::QuadAt& q) {
    uint32_t w[4];
    quad_words((uint64_t)q.gq, e.tid, a.stream, a.keys[0], a.keys[1], w[0], w[1], w[2], w[3]);
    quad::store_quad(quad::global((uint32_t*)e.p), q, e.n, w);
  });
}

// ------------------------------------------------------------------------------ exact restore
// The exact-restore form, one quad per thread (grid-stride), the rules of ../restore.h (quad_pass.cuh).
template <int P>
__global__ void __launch_bounds__(THREADS) noise_axpy_exact_kernel(const LaunchArgs a) {
  quad::exact_pass<P>(a, [&](const Entry& e, int64_t gq, int64_t e0, float sn[4], float su[4]) {
    float sv[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (e.s) {
      const int64_t i = gq - (e.off >> 2);
      load_sigma(e, quad::QuadAt{i, gq, e0, e0 >= 0 && e0 + 4 <= e.n && e.aligned != 0}, sv);
    }
    quad::key_sums(a.noise, (uint64_t)gq, e.tid, a.stream, a.K, a.keys, a.alphas, a.invert ? a.undo : nullptr, sn, su,
                   e.s != nullptr, sv);
  });
}

template <int P>
void launch_p(const LaunchArgs& a, dim3 grid, cudaStream_t s) {
  switch (a.ddt) {
    case F32: noise_axpy_kernel<P, F32><<<grid, THREADS, 0, s>>>(a); break;
    case BF16: noise_axpy_kernel<P, BF16><<<grid, THREADS, 0, s>>>(a); break;
    case F16: noise_axpy_kernel<P, F16><<<grid, THREADS, 0, s>>>(a); break;
    default: noise_axpy_kernel<P, NONE><<<grid, THREADS, 0, s>>>(a); break;
  }
}

}  // namespace

cudaError_t launch_noise(const LaunchArgs& a, cudaStream_t s) {
  if (a.exact)
    return quad::launch_for_kind(a.pdt, a.total_quads, THREADS, [&](auto p, dim3 grid) {
      noise_axpy_exact_kernel<decltype(p)::value><<<grid, THREADS, 0, s>>>(a);
    });
  if (a.pdt == U32)
    return quad::launch_quads(a.total_quads, THREADS,
                              [&](dim3 grid) { noise_words_kernel<<<grid, THREADS, 0, s>>>(a); });
  return quad::launch_for_kind(a.pdt, a.total_quads, THREADS,
                               [&](auto p, dim3 grid) { launch_p<decltype(p)::value>(a, grid, s); });
}

}  // namespace cuda
}  // namespace zo
