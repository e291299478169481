// CPU kernel of the low-rank pass (zo_kernels/lowrank.py is the reference; DESIGN.md section 7):
//
//   W = sum_j alpha_j U_j (+ beta D),  Wu = sum_j undo_j U_j       (m x r, fp32, from +0, keys in order)
//   s[i, j] = sum_k W[i, k] V[j, k]                                 (from W[i,0] V[j,0], k in order)
//   theta0 = invert(theta, s_undo [, plane])  when some undo_j != 0; else the plane records theta's residues
//   theta  = round(gamma theta0 + s)
//
// U rows are global (row0 = offset / n for a dim-0 shard). W, Wu and V (transposed, r x n) are generated
// into scratch first: (m + n) r floats (2m + n with undo), never theta's size. The pass over theta then
// runs in blocks of 64 elements aligned to global quads, as the full-rank kernel does, so each residue
// plane word and each quad of stochastic-rounding bits belongs to one block; inside a block the elements
// of one row form a contiguous run whose k-sum vectorises.
//
// Op schema and CPU registration live here (a fragment of the zo_kernels library), so the full-rank
// files stay as they are.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../native_args.h"
#include "../philox.h"
#include "../restore.h"

namespace zo {
namespace cpu {
namespace {

constexpr int LR_QUADS = 16;             // quads per block
constexpr int LR_BLOCK = 4 * LR_QUADS;   // elements per block
constexpr int64_t LR_GRAIN = 256;        // blocks per parallel chunk at least
constexpr uint32_t U_STREAM = 3, V_STREAM = 4;

// out[e] = z(key, tid, offset + e, stream) for e in [0, count).
void fill_normals(float* out, int64_t count, int64_t offset, uint32_t k0, uint32_t k1, uint32_t tid,
                  uint32_t stream) {
  if (count == 0) return;
  const int64_t q0 = offset >> 2, q1 = (offset + count + 3) >> 2;
  at::parallel_for(q0, q1, 4096, [&](int64_t a, int64_t b) {
    for (int64_t q = a; q < b; ++q) {
      float z[4];
      normals4((uint64_t)q, tid, stream, k0, k1, z[0], z[1], z[2], z[3]);
      for (int c = 0; c < 4; ++c) {
        const int64_t e = 4 * q + c - offset;
        if (e >= 0 && e < count) out[e] = z[c];
      }
    }
  });
}

// The factors of one tensor: W (and Wu when inverting) m x r, V transposed r x n.
struct Factors {
  at::Tensor w, wu, vt;
};

Factors make_factors(const at::Tensor& p, const KeyTable& kt, const at::Tensor* dense, float beta, int64_t r,
                     uint32_t tid, int64_t row0, uint32_t kv0, uint32_t kv1) {
  const int64_t m = p.size(0), n = p.numel() / (m ? m : 1);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  Factors f;
  f.w = at::zeros({m * r}, f32);
  if (kt.invert) f.wu = at::zeros({m * r}, f32);
  at::Tensor u = at::empty({m * r}, f32);
  float* W = f.w.data_ptr<float>();
  float* Wu = kt.invert ? f.wu.data_ptr<float>() : nullptr;
  float* U = u.data_ptr<float>();
  const int K = (int)kt.alphas.size();
  for (int j = 0; j < K; ++j) {
    fill_normals(U, m * r, row0 * r, kt.words[2 * j], kt.words[2 * j + 1], tid, U_STREAM);
    const float a = kt.alphas[j];
    for (int64_t e = 0; e < m * r; ++e) W[e] = restore::sum_step(W[e], a, U[e]);
    if (Wu) {
      const float c = kt.undo[j];
      for (int64_t e = 0; e < m * r; ++e) Wu[e] = restore::sum_step(Wu[e], c, U[e]);
    }
  }
  if (dense) {
    const float* D = dense->data_ptr<float>();
    for (int64_t e = 0; e < m * r; ++e) W[e] = restore::sum_step(W[e], beta, D[e]);
  }
  at::Tensor v = at::empty({n * r}, f32);
  fill_normals(v.data_ptr<float>(), n * r, 0, kv0, kv1, tid, V_STREAM);
  f.vt = v.view({n, r}).t().contiguous().view({-1});
  return f;
}

// s[0 .. 64) of the block whose first element has local index e0 (elements outside [0, numel) get 0).
inline void block_sum(const float* __restrict W, const float* __restrict Vt, int64_t r, int64_t n, int64_t numel,
                      int64_t e0, float* __restrict s) {
  for (int e = 0; e < LR_BLOCK; ++e) s[e] = 0.0f;
  int64_t l = e0 > 0 ? e0 : 0;
  const int64_t end = e0 + LR_BLOCK < numel ? e0 + LR_BLOCK : numel;
  while (l < end) {
    const int64_t i = l / n, j = l - i * n;
    const int64_t len = end - l < n - j ? end - l : n - j;
    float* __restrict out = s + (l - e0);
    const float* __restrict wi = W + i * r;
    const float* __restrict v0 = Vt + j;
    const float w0 = wi[0];
    for (int64_t c = 0; c < len; ++c) out[c] = fmul(w0, v0[c]);
    for (int64_t k = 1; k < r; ++k) {
      const float wk = wi[k];
      const float* __restrict vk = Vt + k * n + j;
      for (int64_t c = 0; c < len; ++c) out[c] = fadd(out[c], fmul(wk, vk[c]));
    }
    l += len;
  }
}

struct Pass {
  float gamma;
  bool stochastic;
  uint32_t rk0, rk1;
  int plane_mode;  // 0 none, 1 write residues, 2 read them (inverting)
  int plane_bits;
};

// The pass over blocks [b0, b1) of one tensor. INV: invert theta's rounding first; PL as Pass::plane_mode.
template <int P, bool INV, int PL>
void run_blocks(const Pass& a, void* data, uint8_t* plane, int64_t numel, int64_t off, uint32_t tid,
                const Factors& f, int64_t r, int64_t n, int64_t b0, int64_t b1) {
  using G = restore::Grid<P>;
  using B = typename G::Bits;
  B* __restrict p = (B*)data;
  const float* W = f.w.data_ptr<float>();
  const float* Wu = INV ? f.wu.data_ptr<float>() : nullptr;
  const float* Vt = f.vt.data_ptr<float>();
  const int bits = a.plane_bits;
  const int64_t q0 = off >> 2;
  const int64_t quads = numel ? ((off + numel + 3) >> 2) - q0 : 0;
  const bool sr = a.stochastic && P != restore::F32;
  int32_t mask, step;
  restore::invert_params(PL == 2 ? bits : 0, mask, step);
  alignas(64) B y[LR_BLOCK];
  alignas(64) B th[LR_BLOCK];
  alignas(64) float sn[LR_BLOCK];
  alignas(64) float su[LR_BLOCK];
  alignas(64) float acc[LR_BLOCK];
  alignas(64) uint32_t w[LR_BLOCK];
  for (int64_t b = b0; b < b1; ++b) {
    const uint64_t qb = (uint64_t)(q0 + b * LR_QUADS);
    const int64_t e0 = (int64_t)(qb * 4) - off;
    const int64_t lq0 = b * LR_QUADS;
    const bool full = e0 >= 0 && e0 + LR_BLOCK <= numel;
    if (full) {
      for (int e = 0; e < LR_BLOCK; ++e) y[e] = p[e0 + e];
    } else {
      for (int e = 0; e < LR_BLOCK; ++e) {
        const int64_t i = e0 + e;
        y[e] = (i >= 0 && i < numel) ? p[i] : (B)0;
      }
    }
    block_sum(W, Vt, r, n, numel, e0, sn);
    if constexpr (INV) {
      block_sum(Wu, Vt, r, n, numel, e0, su);
      if constexpr (PL == 2) {
        for (int l = 0; l < LR_QUADS; ++l) {
          const uint32_t word = lq0 + l < quads ? restore::load_word(plane, lq0 + l, bits) : 0u;
          for (int c = 0; c < 4; ++c) w[4 * l + c] = restore::unpack(word, c, bits);
        }
      } else {
        for (int e = 0; e < LR_BLOCK; ++e) w[e] = 0u;
      }
      int unsettled = 0;
      for (int e = 0; e < LR_BLOCK; ++e) {
        bool settled;
        th[e] = restore::invert_first<P>(y[e], su[e], w[e], mask, step, settled);
        unsettled |= (int)!settled;
      }
      if (unsettled)
        for (int e = 0; e < LR_BLOCK; ++e) th[e] = restore::invert<P>(y[e], su[e], w[e], mask, step);
    } else {
      for (int e = 0; e < LR_BLOCK; ++e) th[e] = y[e];
      if constexpr (PL == 1) {
        for (int e = 0; e < LR_BLOCK; ++e) w[e] = restore::residue<P>(y[e], bits);
        for (int l = 0; l < LR_QUADS; ++l)
          if (lq0 + l < quads)
            restore::store_word(plane, lq0 + l, bits,
                                restore::pack4(w[4 * l], w[4 * l + 1], w[4 * l + 2], w[4 * l + 3], bits));
      }
    }
    for (int e = 0; e < LR_BLOCK; ++e) acc[e] = restore::forward(G::to_float(th[e]), a.gamma, sn[e]);
    if (sr) {
      for (int l = 0; l < LR_QUADS; ++l)
        quad_words(qb + (uint64_t)l, tid, STREAM_ROUNDING, a.rk0, a.rk1, w[4 * l], w[4 * l + 1], w[4 * l + 2],
                   w[4 * l + 3]);
      for (int e = 0; e < LR_BLOCK; ++e) y[e] = G::stochastic(acc[e], w[e]);
    } else {
      for (int e = 0; e < LR_BLOCK; ++e) y[e] = G::nearest(acc[e]);
    }
    if (full) {
      for (int e = 0; e < LR_BLOCK; ++e) p[e0 + e] = y[e];
    } else {
      for (int e = 0; e < LR_BLOCK; ++e) {
        const int64_t i = e0 + e;
        if (i >= 0 && i < numel) p[i] = y[e];
      }
    }
  }
}

template <int P>
void run_dt(const Pass& a, bool inv, void* data, uint8_t* plane, int64_t numel, int64_t off, uint32_t tid,
            const Factors& f, int64_t r, int64_t n, int64_t b0, int64_t b1) {
  if (inv) {
    if (a.plane_mode == 2) return run_blocks<P, true, 2>(a, data, plane, numel, off, tid, f, r, n, b0, b1);
    return run_blocks<P, true, 0>(a, data, plane, numel, off, tid, f, r, n, b0, b1);
  }
  if (a.plane_mode == 1) return run_blocks<P, false, 1>(a, data, plane, numel, off, tid, f, r, n, b0, b1);
  return run_blocks<P, false, 0>(a, data, plane, numel, off, tid, f, r, n, b0, b1);
}

void lowrank_axpy_cpu(at::TensorList params, at::IntArrayRef keys_u, int64_t key_v, at::ArrayRef<double> alphas,
                      at::ArrayRef<double> undo, double gamma, at::TensorList dense, double beta,
                      at::TensorList planes, int64_t plane_bits, int64_t rank, int64_t stochastic,
                      at::IntArrayRef tensor_ids, at::IntArrayRef offsets, int64_t rounding_key) {
  const size_t n_t = params.size();
  TORCH_CHECK(undo.empty() || undo.size() == keys_u.size(), "_lowrank_axpy_native: ", keys_u.size(),
              " keys but ", undo.size(), " undo coefficients");
  TORCH_CHECK(rank >= 1 && rank <= 64, "_lowrank_axpy_native: rank ", rank, " is outside [1, 64]");
  if (!planes.empty()) {
    TORCH_CHECK(!undo.empty(), "_lowrank_axpy_native: planes need the exact form (undo)");
    check_exact_args(params, keys_u, alphas, undo, planes, plane_bits, stochastic, tensor_ids, offsets,
                     c10::DeviceType::CPU);
  } else {
    check_axpy_args(params, keys_u, alphas, {}, stochastic, tensor_ids, offsets, c10::DeviceType::CPU);
  }
  TORCH_CHECK(dense.empty() || dense.size() == n_t, "_lowrank_axpy_native: ", dense.size(), " dense tensors for ",
              n_t, " params");
  for (size_t i = 0; i < n_t; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.dim() >= 2, "params[", i, "] has ", p.dim(), " dims; the low-rank pass takes ndim >= 2");
    const int64_t n = p.size(0) ? p.numel() / p.size(0) : 0;
    TORCH_CHECK(n == 0 || offsets[i] % n == 0, "offsets[", i, "]=", offsets[i], " is not a multiple of the row length ",
                n);
    if (!dense.empty()) {
      const at::Tensor& d = dense[i];
      TORCH_CHECK(d.device() == p.device() && d.scalar_type() == at::kFloat && d.is_contiguous() &&
                      d.numel() == p.size(0) * rank,
                  "dense[", i, "] must be a contiguous float32 (", p.size(0), ", ", rank, ") tensor on ", p.device());
    }
  }
  const KeyTable kt = key_table(keys_u, alphas, undo);
  uint32_t kv0, kv1;
  split_key(key_v, kv0, kv1);
  Pass a;
  a.gamma = (float)gamma;
  a.stochastic = stochastic != 0;
  split_key(rounding_key, a.rk0, a.rk1);
  a.plane_mode = planes.empty() ? 0 : (kt.invert ? 2 : 1);
  a.plane_bits = (int)plane_bits;
  for (size_t i = 0; i < n_t; ++i) {
    const at::Tensor& p = params[i];
    const int64_t numel = p.numel();
    if (numel == 0) continue;
    const int64_t n = numel / p.size(0), off = offsets[i];
    const uint32_t tid = (uint32_t)tensor_ids[i];
    const Factors f = make_factors(p, kt, dense.empty() ? nullptr : &dense[i], (float)beta, rank, tid, off / n, kv0,
                                   kv1);
    const int64_t quads = ((off + numel + 3) >> 2) - (off >> 2);
    const int64_t blocks = (quads + LR_QUADS - 1) / LR_QUADS;
    uint8_t* plane = planes.empty() || planes[i].numel() == 0 ? nullptr : planes[i].data_ptr<uint8_t>();
    void* data = p.data_ptr();
    const int code = dtype_code(p.scalar_type());
    at::parallel_for(0, blocks, LR_GRAIN, [&](int64_t b0, int64_t b1) {
      switch (code) {
        case 0: run_dt<restore::F32>(a, kt.invert, data, plane, numel, off, tid, f, rank, n, b0, b1); break;
        case 1: run_dt<restore::BF16>(a, kt.invert, data, plane, numel, off, tid, f, rank, n, b0, b1); break;
        case 2: run_dt<restore::F16>(a, kt.invert, data, plane, numel, off, tid, f, rank, n, b0, b1); break;
        default: break;
      }
    });
  }
}

}  // namespace
}  // namespace cpu
}  // namespace zo

TORCH_LIBRARY_FRAGMENT(zo_kernels, m) {
  // The low-rank pass (zo_kernels/lowrank.py) for tensors with ndim >= 2; `undo` empty: no inversion.
  m.def("_lowrank_axpy_native(Tensor(a!)[] params, int[] keys_u, int key_v, float[] alphas, float[] undo, "
        "float gamma, Tensor[] dense, float beta, Tensor(b!)[] planes, int plane_bits, int rank, int stochastic, "
        "int[] tensor_ids, int[] offsets, int rounding_key) -> ()");
}

TORCH_LIBRARY_IMPL(zo_kernels, CPU, m) { m.impl("_lowrank_axpy_native", &zo::cpu::lowrank_axpy_cpu); }
