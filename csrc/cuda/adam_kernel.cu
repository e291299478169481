// CUDA kernel of the fused ZO-Adam pass (see adam_kernel.h). Only philox.h, adam.h and CUDA headers:
// tests/test_nvcc_compile.py checks its PTX. The per-element math is ../adam.h with __fmul_rn /
// __fadd_rn / __fdiv_rn / __fsqrt_rn (no FMA), the same bits as the CPU kernel from the same z.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../adam.h"
#include "../philox.h"
#include "adam_kernel.h"

namespace zo {
namespace cuda {
namespace {

constexpr int ADAM_THREADS = 256;

template <int P> struct AIO;

template <> struct AIO<0> {  // float32
  using T = float;
  static __device__ __forceinline__ void load4(const float* p, float v[4]) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
  }
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float round(float a, bool, uint32_t) { return a; }
  static __device__ __forceinline__ void store4(float* p, const float v[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

template <int P> struct AIO16 {  // bfloat16 (1) / float16 (2) as raw bits
  using T = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return P == 1 ? bf16_to_float(v) : fp16_to_float(v); }
  static __device__ __forceinline__ void load4(const uint16_t* p, float v[4]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    v[0] = load((uint16_t)(u.x & 0xFFFFu)); v[1] = load((uint16_t)(u.x >> 16));
    v[2] = load((uint16_t)(u.y & 0xFFFFu)); v[3] = load((uint16_t)(u.y >> 16));
  }
  static __device__ __forceinline__ uint16_t round(float a, bool sr, uint32_t w) {
    if (P == 1) return sr ? float_to_bf16_sr(a, w) : float_to_bf16_rne(a);
    return sr ? float_to_fp16_sr(a, w) : float_to_fp16_rne(a);
  }
  static __device__ __forceinline__ void store4(uint16_t* p, const uint16_t v[4]) {
    *reinterpret_cast<uint2*>(p) = make_uint2((uint32_t)v[0] | ((uint32_t)v[1] << 16),
                                              (uint32_t)v[2] | ((uint32_t)v[3] << 16));
  }
};
template <> struct AIO<1> : AIO16<1> {};
template <> struct AIO<2> : AIO16<2> {};

__device__ __forceinline__ void load4f(const float* p, float v[4]) {
  const float4 f = *reinterpret_cast<const float4*>(p);
  v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
}

__device__ __forceinline__ void store4f(float* p, const float v[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

template <int P>
__global__ void __launch_bounds__(ADAM_THREADS) noise_adam_kernel(const AdamLaunch a) {
  using PT = typename AIO<P>::T;
  const int64_t S = (int64_t)gridDim.x * blockDim.x;
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool sr = a.stochastic && P != 0;
  for (int t = 0; t < a.T; ++t) {
    const AdamEntry e = a.table[t];
    PT* __restrict__ p = (PT*)e.p;
    float* __restrict__ m = e.m;
    float* __restrict__ v = e.v;
    const int64_t q0 = e.off >> 2;
    const int64_t nq = e.n ? ((e.off + e.n + 3) >> 2) - q0 : 0;
    int64_t i = g - e.quad_start % S;  // continue where the previous tensor stopped
    if (i < 0) i += S;
    for (; i < nq; i += S) {
      const int64_t gq = q0 + i;
      const int64_t e0 = gq * 4 - e.off;
      const bool vec = e.aligned && e0 >= 0 && e0 + 4 <= e.n;
      float gr[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int j = 0; j < a.K; ++j) {
        float z[4];
        normals4((uint64_t)gq, e.tid, STREAM_NOISE, a.keys[2 * j], a.keys[2 * j + 1], z[0], z[1], z[2], z[3]);
        const float c = a.coeffs[j];
#pragma unroll
        for (int k = 0; k < 4; ++k) gr[k] = fadd(gr[k], fmul(c, z[k]));
      }
      float th[4], mm[4], vv[4];
      if (vec) {
        AIO<P>::load4(p + e0, th);
        load4f(m + e0, mm);
        load4f(v + e0, vv);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int64_t x = e0 + k;
          const bool in = x >= 0 && x < e.n;
          th[k] = in ? AIO<P>::load(p[x]) : 0.0f;
          mm[k] = in ? m[x] : 0.0f;
          vv[k] = in ? v[x] : 0.0f;
        }
      }
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (sr) quad_words((uint64_t)gq, e.tid, STREAM_ROUNDING, a.rk0, a.rk1, w[0], w[1], w[2], w[3]);
      PT out[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = AIO<P>::round(adam_element(th[k], gr[k], mm[k], vv[k], a.c), sr, w[k]);
      if (vec) {
        AIO<P>::store4(p + e0, out);
        store4f(m + e0, mm);
        store4f(v + e0, vv);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int64_t x = e0 + k;
          if (x >= 0 && x < e.n) {
            p[x] = out[k];
            m[x] = mm[k];
            v[x] = vv[k];
          }
        }
      }
    }
  }
}

int adam_sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return sms > 0 ? sms : 1;
}

}  // namespace

cudaError_t launch_adam(const AdamLaunch& a, cudaStream_t s) {
  if (a.total_quads <= 0) return cudaSuccess;
  const int64_t want = (a.total_quads + ADAM_THREADS - 1) / ADAM_THREADS;
  const int64_t cap = (int64_t)adam_sm_count() * 8;
  const dim3 grid((unsigned)(want < cap ? want : cap));
  switch (a.pdt) {
    case 0: noise_adam_kernel<0><<<grid, ADAM_THREADS, 0, s>>>(a); break;
    case 1: noise_adam_kernel<1><<<grid, ADAM_THREADS, 0, s>>>(a); break;
    case 2: noise_adam_kernel<2><<<grid, ADAM_THREADS, 0, s>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace zo
