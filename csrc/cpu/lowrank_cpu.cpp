// CPU kernel of the low-rank pass (zo_kernels/lowrank.py is the reference; docs/spec.md §7):
//
//   W = sum_j alpha_j U_j (+ beta D),  Wu = sum_j undo_j U_j       (m x r, fp32, from +0, keys in order)
//   s[i, j] = sum_k W[i, k] V[j, k]                                 (from W[i,0] V[j,0], k in order)
//   theta0 = invert(theta, s_undo [, plane])  when some undo_j != 0; else the plane records theta's residues
//   theta  = round(gamma theta0 + s)
//
// U rows are global (row0 = offset / n for a dim-0 shard). W, Wu and V (transposed, r x n) are generated
// into scratch first: (m + n) r floats (2m + n with undo), never theta's size. The pass over theta (and
// the factors' normals) run in the instruction set cpu_isa() selects: lowrank_isa.h, compiled per ISA in
// kernel_<isa>.cpp.
//
// The op's schema is in csrc/ops.cpp with the others; its CPU registration is here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../lowrank_args.h"
#include "../philox.h"
#include "../restore.h"
#include "lowrank_kernel.h"

namespace zo {
namespace cpu {
namespace {

constexpr int64_t LR_GRAIN = 256;        // blocks per parallel chunk at least

// The entry points of the instruction set the kernels run with (cpu_isa()).
struct LowrankIsa {
  NormalsFn normals;
  LowrankFn run;
};

LowrankIsa lowrank_isa() {
  switch (selected_isa()) {
    case 2: return {&avx512::lowrank_normals, &avx512::lowrank_run};
    case 1: return {&avx2::lowrank_normals, &avx2::lowrank_run};
    default: return {&base::lowrank_normals, &base::lowrank_run};
  }
}

// out[e] = z(key, tid, offset + e, stream) for e in [0, count).
void fill_normals(const LowrankIsa& isa, float* out, int64_t count, int64_t offset, uint32_t k0, uint32_t k1,
                  uint32_t tid, uint32_t stream) {
  if (count == 0) return;
  const NormalsJob job{out, count, offset, k0, k1, tid, stream};
  at::parallel_for(0, (quad_span(count, offset) + LR_QUADS - 1) / LR_QUADS, 64,
                   [&](int64_t b0, int64_t b1) { isa.normals(job, b0, b1); });
}

// The factors of one tensor: W (and Wu when inverting) m x r, V transposed r x n.
struct Factors {
  at::Tensor w, wu, vt;
};

Factors make_factors(const LowrankIsa& isa, const at::Tensor& p, const KeyTable& kt, const at::Tensor* dense,
                     float beta, int64_t r, uint32_t tid, int64_t row0, uint32_t kv0, uint32_t kv1) {
  const int64_t m = p.size(0), n = lowrank_cols(p);
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
    fill_normals(isa, U, m * r, row0 * r, kt.words[2 * j], kt.words[2 * j + 1], tid, STREAM_LOWRANK_U);
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
  fill_normals(isa, v.data_ptr<float>(), n * r, 0, kv0, kv1, tid, STREAM_LOWRANK_V);
  f.vt = v.view({n, r}).t().contiguous().view({-1});
  return f;
}

void lowrank_axpy_cpu(const LowrankCall& c) {
  uint32_t kv0, kv1;
  split_key(c.key_v, kv0, kv1);
  LowrankPass a;
  set_lowrank_scalars(a, c);
  const LowrankIsa isa = lowrank_isa();
  for (size_t i = 0; i < c.params.size(); ++i) {
    const at::Tensor& p = c.params[i];
    if (p.numel() == 0) continue;
    const int64_t n = lowrank_cols(p), off = c.offsets[i];
    const uint32_t tid = (uint32_t)c.tensor_ids[i];
    const Factors f = make_factors(isa, p, c.kt, c.dense.empty() ? nullptr : &c.dense[i], (float)c.beta, c.rank, tid,
                                   off / n, kv0, kv1);
    LowrankTask t;
    t.p = p.data_ptr();
    t.plane = c.planes.empty() || c.planes[i].numel() == 0 ? nullptr : c.planes[i].data_ptr<uint8_t>();
    t.numel = p.numel();
    t.cols = n;
    t.off = off;
    t.tid = tid;
    t.pdt = dtype_code(p.scalar_type());
    t.w = f.w.data_ptr<float>();
    t.wu = c.kt.invert ? f.wu.data_ptr<float>() : nullptr;
    t.vt = f.vt.data_ptr<float>();
    at::parallel_for(0, (quad_span(t.numel, off) + LR_QUADS - 1) / LR_QUADS, LR_GRAIN,
                     [&](int64_t b0, int64_t b1) { isa.run(a, t, b0, b1); });
  }
}

}  // namespace
}  // namespace cpu
}  // namespace zo

TORCH_LIBRARY_IMPL(zo_kernels, CPU, m) {
  m.impl("_lowrank_axpy_native", &zo::lowrank_axpy_op<c10::DeviceType::CPU, &zo::cpu::lowrank_axpy_cpu>);
}
