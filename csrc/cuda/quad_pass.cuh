// Per-quad steps shared by the CUDA kernels (noise_kernel.cu, lowrank_kernel.cu, adam_kernel.cu): the
// grid-stride walk over a launch's tensors, raw quad loads / stores, rounding, residue-plane words, the
// exact form's finish of a quad (../restore.h: invert or record residues, then
// theta <- round(gamma theta0 + s)), and the host side of a launch. No torch: philox.h, restore.h and
// CUDA headers only.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "../philox.h"
#include "../restore.h"

namespace zo {
namespace cuda {
namespace quad {

// First local quad of a tensor for thread g of S, so that consecutive tensors continue where the
// previous one stopped instead of all starting at thread 0.
__device__ __forceinline__ int64_t first_quad(int64_t g, int64_t S, int64_t quad_start) {
  int64_t i = g - quad_start % S;
  return i < 0 ? i + S : i;
}

// `ptr` (read from a device table) points to global memory: lets nvcc emit ld.global / st.global
// (and vector forms) instead of generic accesses, as it does for pointers it can trace to a parameter.
template <class T>
__device__ __forceinline__ T* global(T* ptr) {
  __builtin_assume(__isGlobal(ptr));
  return ptr;
}

// One vector access of a quad: 16 bytes of 32-bit values, 8 bytes of 16-bit ones.
__device__ __forceinline__ void load4(const uint32_t* p, uint32_t v[4]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  v[0] = u.x; v[1] = u.y; v[2] = u.z; v[3] = u.w;
}
__device__ __forceinline__ void store4(uint32_t* p, const uint32_t v[4]) {
  *reinterpret_cast<uint4*>(p) = make_uint4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void load4(const uint16_t* p, uint16_t v[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  v[0] = (uint16_t)(u.x & 0xFFFFu); v[1] = (uint16_t)(u.x >> 16);
  v[2] = (uint16_t)(u.y & 0xFFFFu); v[3] = (uint16_t)(u.y >> 16);
}
__device__ __forceinline__ void store4(uint16_t* p, const uint16_t v[4]) {
  *reinterpret_cast<uint2*>(p) = make_uint2((uint32_t)v[0] | ((uint32_t)v[1] << 16),
                                            (uint32_t)v[2] | ((uint32_t)v[3] << 16));
}

// Where one thread stands in a tensor of a pass: its quad and how to reach the quad's elements.
struct QuadAt {
  int64_t i;   // local quad: the tensor's residue-plane word
  int64_t gq;  // global quad: the Philox counter
  int64_t e0;  // local index of the quad's first element (the quads at the tensor's ends stick out)
  bool vec;    // the quad lies inside the tensor and the row's data is aligned: one vector access
};

// The quad's elements of a tensor of n elements (raw bits: restore::Grid<K>::Bits, or uint32 words),
// read (LOAD) into v or written from v: one vector access when q.vec, else element by element. Outside
// [0, n) they read as +0 (residue 0, as restore.pack_residues writes partial quads) and are never written.
template <bool LOAD, class B>
__device__ __forceinline__ void access_quad(B* p, const QuadAt& q, int64_t n, B v[4]) {
  if (q.vec) {
    if constexpr (LOAD) load4(p + q.e0, v);
    else store4(p + q.e0, v);
    return;
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int64_t k = q.e0 + c;
    const bool in = k >= 0 && k < n;
    if constexpr (LOAD) v[c] = in ? p[k] : (B)0;
    else if (in) p[k] = v[c];
  }
}

template <class B>
__device__ __forceinline__ void load_quad(const B* p, const QuadAt& q, int64_t n, B v[4]) {
  access_quad<true>(const_cast<B*>(p), q, n, v);
}

template <class B>
__device__ __forceinline__ void store_quad(B* p, const QuadAt& q, int64_t n, B v[4]) {
  access_quad<false>(p, q, n, v);
}

// The quad as floats of storage kind K (restore::Grid<K>; float32 is read as its bits).
template <int K>
__device__ __forceinline__ void load_floats(const void* p, const QuadAt& q, int64_t n, float x[4]) {
  using G = restore::Grid<K>;
  typename G::Bits b[4];
  load_quad((const typename G::Bits*)p, q, n, b);
#pragma unroll
  for (int c = 0; c < 4; ++c) x[c] = G::to_float(b[c]);
}

// Thread g of the grid's S threads over every tensor of a launch (Row: a table row with n, off,
// quad_start, aligned): body(row, quad) for each of its quads, grid-stride.
template <class Row, class Body>
__device__ __forceinline__ void each_quad(const Row* table, int T, Body&& body) {
  const int64_t S = (int64_t)gridDim.x * blockDim.x;
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (int t = 0; t < T; ++t) {
    const Row e = table[t];
    const int64_t q0 = e.off >> 2;
    const int64_t nq = e.n ? ((e.off + e.n + 3) >> 2) - q0 : 0;
    for (int64_t i = first_quad(g, S, e.quad_start); i < nq; i += S) {
      const int64_t e0 = (q0 + i) * 4 - e.off;
      body(e, QuadAt{i, q0 + i, e0, e0 >= 0 && e0 + 4 <= e.n && e.aligned != 0});
    }
  }
}

// Plane word w: one load of its size where the plane is aligned to it, else byte by byte.
__device__ __forceinline__ uint32_t plane_load(const uint8_t* pl, int64_t w, int bits, bool aligned) {
  if (aligned) {
    if (bits == 2) return pl[w];
    if (bits == 4) return reinterpret_cast<const uint16_t*>(pl)[w];
    return reinterpret_cast<const uint32_t*>(pl)[w];
  }
  return restore::load_word(pl, w, bits);
}

__device__ __forceinline__ void plane_store(uint8_t* pl, int64_t w, int bits, bool aligned, uint32_t word) {
  if (aligned) {
    if (bits == 2) pl[w] = (uint8_t)word;
    else if (bits == 4) reinterpret_cast<uint16_t*>(pl)[w] = (uint16_t)word;
    else reinterpret_cast<uint32_t*>(pl)[w] = word;
    return;
  }
  restore::store_word(pl, w, bits, word);
}

// sn[c] = sum_j alphas[j] z_j[c] and (when undo) su[c] = sum_j undo[j] z_j[c] over the K keys, from +0 in
// key order, z_j the noise of form `noise` (noise4: normals or signs) of quad gq of the stream, times the
// scaled form's sigma sv when `scaled` (docs/spec.md §10; a flag, not a null sv, so sv stays in registers):
// the exact form's s_new / s_undo and the low-rank W / Wu (always normals, never scaled).
__device__ __forceinline__ void key_sums(int noise, uint64_t gq, uint32_t tid, uint32_t stream, int K,
                                         const uint32_t* keys, const float* alphas, const float* undo, float sn[4],
                                         float su[4], bool scaled = false, const float* sv = nullptr) {
#pragma unroll
  for (int c = 0; c < 4; ++c) sn[c] = su[c] = 0.0f;
  for (int j = 0; j < K; ++j) {
    float z[4];
    noise4(noise, gq, tid, stream, keys[2 * j], keys[2 * j + 1], z[0], z[1], z[2], z[3]);
    if (scaled) {
#pragma unroll
      for (int c = 0; c < 4; ++c) z[c] = fmul(sv[c], z[c]);
    }
    const float alpha = alphas[j];
#pragma unroll
    for (int c = 0; c < 4; ++c) sn[c] = restore::sum_step(sn[c], alpha, z[c]);
    if (undo) {
      const float u = undo[j];
#pragma unroll
      for (int c = 0; c < 4; ++c) su[c] = restore::sum_step(su[c], u, z[c]);
    }
  }
}

// out = acc rounded to storage kind P (restore::Grid): stochastically with the stream-2 words of quad gq
// under the rounding key (rk0, rk1) when sr, else to nearest.
template <int P>
__device__ __forceinline__ void round_quad(const float acc[4], bool sr, uint64_t gq, uint32_t tid, uint32_t rk0,
                                           uint32_t rk1, typename restore::Grid<P>::Bits out[4]) {
  using G = restore::Grid<P>;
  if (sr) {
    uint32_t w[4];
    quad_words(gq, tid, STREAM_ROUNDING, rk0, rk1, w[0], w[1], w[2], w[3]);
#pragma unroll
    for (int c = 0; c < 4; ++c) out[c] = G::stochastic(acc[c], w[c]);
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) out[c] = G::nearest(acc[c]);
  }
}

// The launch-uniform mode of a pass (so its branches never diverge).
struct Mode {
  float gamma;
  bool sr;          // stochastic rounding (bf16 / fp16 only)
  uint32_t rk0, rk1;
  bool invert;      // some undo != 0: invert theta's rounding first
  int plane_mode;   // 0 none, 1 write residues (not inverting), 2 read them (inverting)
  int bits;         // plane bits
  int32_t mask, step;  // restore::invert_params
};

__device__ __forceinline__ Mode make_mode(float gamma, bool sr, uint32_t rk0, uint32_t rk1, bool invert,
                                          int plane_mode, int bits) {
  Mode m{gamma, sr, rk0, rk1, invert, plane_mode, bits, 0, 0};
  restore::invert_params(plane_mode == 2 ? bits : 0, m.mask, m.step);
  return m;
}

// Quad gq (global) of tensor tid, plane word i, with theta's bits y and the sums s_new (sn) and s_undo (su):
//   theta0 = invert(y, su [, plane residue])   when inverting; else the plane records y's residues
//   out    = round(gamma theta0 + sn)           (stream-2 words of gq under the rounding key when sr)
// The one per-element branch is the rare full candidate search (restore::invert_first / invert).
template <int P>
__device__ __forceinline__ void finish_quad(const Mode& m, const typename restore::Grid<P>::Bits y[4],
                                            const float sn[4], const float su[4], uint8_t* plane, bool plane_aligned,
                                            int64_t i, uint64_t gq, uint32_t tid,
                                            typename restore::Grid<P>::Bits out[4]) {
  using G = restore::Grid<P>;
  using B = typename G::Bits;
  B th[4];
  if (m.invert) {
    const uint32_t word = m.plane_mode == 2 ? plane_load(plane, i, m.bits, plane_aligned) : 0u;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t res = restore::unpack(word, c, m.bits);
      bool settled;
      th[c] = restore::invert_first<P>(y[c], su[c], res, m.mask, m.step, settled);
      if (!settled) th[c] = restore::invert<P>(y[c], su[c], res, m.mask, m.step);
    }
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) th[c] = y[c];
    if (m.plane_mode == 1)
      plane_store(plane, i, m.bits, plane_aligned,
                  restore::pack4(restore::residue<P>(th[0], m.bits), restore::residue<P>(th[1], m.bits),
                                 restore::residue<P>(th[2], m.bits), restore::residue<P>(th[3], m.bits), m.bits));
  }
  float acc[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) acc[c] = restore::forward(G::to_float(th[c]), m.gamma, sn[c]);
  round_quad<P>(acc, m.sr, gq, tid, m.rk0, m.rk1, out);
}

// An exact-form pass over every tensor of a launch (A: launch args with table, T, gamma, stochastic, rk0,
// rk1, invert, plane_mode, plane_bits; its rows carry p and plane, plane_aligned, tid besides each_quad's
// fields): load theta's bits, sums(row, gq, e0, sn, su) fills the two sums of global quad gq (local
// element e0 first), finish_quad, store.
template <int P, class A, class Sums>
__device__ __forceinline__ void exact_pass(const A& a, Sums&& sums) {
  using B = typename restore::Grid<P>::Bits;
  const Mode m = make_mode(a.gamma, a.stochastic && P != restore::F32, a.rk0, a.rk1, a.invert != 0, a.plane_mode,
                           a.plane_bits);
  each_quad(a.table, a.T, [&](const auto& e, const QuadAt& q) {
    B* p = global((B*)e.p);
    B y[4];
    load_quad(p, q, e.n, y);
    float sn[4], su[4];
    sums(e, q.gq, q.e0, sn, su);
    B out[4];
    finish_quad<P>(m, y, sn, su, e.plane, e.plane_aligned, q.i, (uint64_t)q.gq, e.tid, out);
    store_quad(p, q, e.n, out);
  });
}

// Threads of a persistent grid: ceil(work / threads) blocks, at most 8 per SM.
inline unsigned grid_blocks(int64_t work, int threads) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                cudaSuccess || sms <= 0)
    sms = 1;
  const int64_t want = (work + threads - 1) / threads;
  const int64_t cap = (int64_t)sms * 8;
  return (unsigned)(want < cap ? want : cap);
}

// launch(grid) with the persistent grid of `work` quads in blocks of `threads`, then the launch's error;
// nothing when there is no work. Host code.
template <class Launch>
inline cudaError_t launch_quads(int64_t work, int threads, Launch&& launch) {
  if (work <= 0) return cudaSuccess;
  launch(dim3(grid_blocks(work, threads)));
  return cudaGetLastError();
}

// launch_quads with launch(kind, grid), kind the std::integral_constant of storage kind k (float32,
// bfloat16, float16); cudaErrorInvalidValue for any other k. Host code.
template <class Launch>
inline cudaError_t launch_for_kind(int k, int64_t work, int threads, Launch&& launch) {
  if (k != restore::F32 && k != restore::BF16 && k != restore::F16) return cudaErrorInvalidValue;
  return launch_quads(work, threads, [&](dim3 grid) {
    if (k == restore::F32) launch(std::integral_constant<int, restore::F32>{}, grid);
    else if (k == restore::BF16) launch(std::integral_constant<int, restore::BF16>{}, grid);
    else launch(std::integral_constant<int, restore::F16>{}, grid);
  });
}

}  // namespace quad
}  // namespace cuda
}  // namespace zo
