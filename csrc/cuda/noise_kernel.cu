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

template <int DT> struct IO;

template <> struct IO<F32> {
  using T = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float nearest(float a) { return a; }
  static __device__ __forceinline__ float stochastic(float a, uint32_t) { return a; }
  static __device__ __forceinline__ void load4(const float* p, float v[4]) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
  }
  static __device__ __forceinline__ void store4(float* p, const float v[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// bf16 / fp16 as raw uint16 bits, converted by philox.h (identical to the CPU kernel).
template <int DT> struct IO16 {
  using T = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) {
    return DT == BF16 ? bf16_to_float(v) : fp16_to_float(v);
  }
  static __device__ __forceinline__ uint16_t nearest(float a) {
    return DT == BF16 ? float_to_bf16_rne(a) : float_to_fp16_rne(a);
  }
  static __device__ __forceinline__ uint16_t stochastic(float a, uint32_t w) {
    return DT == BF16 ? float_to_bf16_sr(a, w) : float_to_fp16_sr(a, w);
  }
  static __device__ __forceinline__ void load4(const uint16_t* p, float v[4]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    v[0] = load((uint16_t)(u.x & 0xFFFFu)); v[1] = load((uint16_t)(u.x >> 16));
    v[2] = load((uint16_t)(u.y & 0xFFFFu)); v[3] = load((uint16_t)(u.y >> 16));
  }
  static __device__ __forceinline__ void store4(uint16_t* p, const uint16_t v[4]) {
    *reinterpret_cast<uint2*>(p) = make_uint2((uint32_t)v[0] | ((uint32_t)v[1] << 16),
                                              (uint32_t)v[2] | ((uint32_t)v[3] << 16));
  }
};
template <> struct IO<BF16> : IO16<BF16> {};
template <> struct IO<F16> : IO16<F16> {};

// theta <- gamma theta + sum_j alpha_j z_j + beta dense (or out <- z of keys[0] when !has_x).
template <int P, int D>
__global__ void __launch_bounds__(THREADS) noise_axpy_kernel(const LaunchArgs a) {
  using PT = typename IO<P>::T;
  constexpr int DD = D == NONE ? F32 : D;
  using DT = typename IO<DD>::T;
  const int64_t S = (int64_t)gridDim.x * blockDim.x;
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool sr = a.stochastic && P != F32;
  for (int t = 0; t < a.T; ++t) {
    const Entry e = a.table[t];
    PT* p = (PT*)e.p;  // no __restrict__: dense may be the parameter itself
    const DT* d = (const DT*)e.d;
    const int64_t q0 = e.off >> 2;
    const int64_t nq = e.n ? ((e.off + e.n + 3) >> 2) - q0 : 0;
    for (int64_t i = quad::first_quad(g, S, e.quad_start); i < nq; i += S) {
      const int64_t gq = q0 + i;
      const int64_t e0 = gq * 4 - e.off;  // local index of the quad's first element
      const bool full = e0 >= 0 && e0 + 4 <= e.n;
      const bool vec = full && e.aligned;
      float acc[4];
      if (a.has_x) {
        float x[4];
        if (vec) {
          IO<P>::load4(p + e0, x);
        } else {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t k = e0 + c;
            x[c] = (k >= 0 && k < e.n) ? IO<P>::load(p[k]) : 0.0f;
          }
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[c] = fmul(x[c], a.gamma);
        for (int j = 0; j < a.K; ++j) {
          float z[4];
          normals4((uint64_t)gq, e.tid, a.stream, a.keys[2 * j], a.keys[2 * j + 1], z[0], z[1], z[2], z[3]);
          const float alpha = a.alphas[j];
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[c] = fadd(acc[c], fmul(alpha, z[c]));
        }
      } else {
        normals4((uint64_t)gq, e.tid, a.stream, a.keys[0], a.keys[1], acc[0], acc[1], acc[2], acc[3]);
      }
      if (D != NONE) {
        float y[4];
        if (vec) {
          IO<DD>::load4(d + e0, y);
        } else {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t k = e0 + c;
            y[c] = (k >= 0 && k < e.n) ? IO<DD>::load(d[k]) : 0.0f;
          }
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[c] = fadd(acc[c], fmul(a.beta, y[c]));
      }
      PT out[4];
      if (sr) {
        uint32_t w[4];
        quad_words((uint64_t)gq, e.tid, STREAM_ROUNDING, a.rk0, a.rk1, w[0], w[1], w[2], w[3]);
#pragma unroll
        for (int c = 0; c < 4; ++c) out[c] = IO<P>::stochastic(acc[c], w[c]);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) out[c] = IO<P>::nearest(acc[c]);
      }
      if (vec) {
        IO<P>::store4(p + e0, out);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t k = e0 + c;
          if (k >= 0 && k < e.n) p[k] = out[c];
        }
      }
    }
  }
}

// Raw Philox words of keys[0] (the integer layer; tests).
__global__ void __launch_bounds__(THREADS) noise_words_kernel(const LaunchArgs a) {
  const int64_t S = (int64_t)gridDim.x * blockDim.x;
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (int t = 0; t < a.T; ++t) {
    const Entry e = a.table[t];
    uint32_t* __restrict__ p = (uint32_t*)e.p;
    const int64_t q0 = e.off >> 2;
    const int64_t nq = e.n ? ((e.off + e.n + 3) >> 2) - q0 : 0;
    for (int64_t i = quad::first_quad(g, S, e.quad_start); i < nq; i += S) {
      const int64_t gq = q0 + i;
      const int64_t e0 = gq * 4 - e.off;
      uint32_t w[4];
      quad_words((uint64_t)gq, e.tid, a.stream, a.keys[0], a.keys[1], w[0], w[1], w[2], w[3]);
      if (e0 >= 0 && e0 + 4 <= e.n && e.aligned) {
        *reinterpret_cast<uint4*>(p + e0) = make_uint4(w[0], w[1], w[2], w[3]);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t k = e0 + c;
          if (k >= 0 && k < e.n) p[k] = w[c];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ exact restore
// The exact-restore form, one quad per thread (grid-stride), the rules of ../restore.h (quad_pass.cuh).
template <int P>
__global__ void __launch_bounds__(THREADS) noise_axpy_exact_kernel(const LaunchArgs a) {
  const int64_t S = (int64_t)gridDim.x * blockDim.x;
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const quad::Mode mode = quad::make_mode(a.gamma, a.stochastic && P != F32, a.rk0, a.rk1, a.invert != 0,
                                          a.plane_mode, a.plane_bits);
  for (int t = 0; t < a.T; ++t) {
    const Entry e = a.table[t];
    quad::exact_quads<P>(mode, e, g, S, [&](int64_t gq, int64_t, float sn[4], float su[4]) {
      quad::key_sums((uint64_t)gq, e.tid, STREAM_NOISE, a.K, a.keys, a.alphas, a.invert ? a.undo : nullptr, sn, su);
    });
  }
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
  if (a.total_quads <= 0) return cudaSuccess;
  const dim3 grid(quad::grid_blocks(a.total_quads, THREADS));
  if (a.exact) {
    switch (a.pdt) {
      case F32: noise_axpy_exact_kernel<F32><<<grid, THREADS, 0, s>>>(a); break;
      case BF16: noise_axpy_exact_kernel<BF16><<<grid, THREADS, 0, s>>>(a); break;
      case F16: noise_axpy_exact_kernel<F16><<<grid, THREADS, 0, s>>>(a); break;
      default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
  }
  switch (a.pdt) {
    case F32: launch_p<F32>(a, grid, s); break;
    case BF16: launch_p<BF16>(a, grid, s); break;
    case F16: launch_p<F16>(a, grid, s); break;
    case U32: noise_words_kernel<<<grid, THREADS, 0, s>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace zo
