// Checks of _lowrank_axpy_native's arguments, shared by the CPU and CUDA glue (torch side).
#pragma once

#include <ATen/ATen.h>

#include "native_args.h"

namespace zo {

constexpr int64_t LOWRANK_MAX_RANK = 64;  // zo_kernels.lowrank.MAX_RANK

// Rows and row length of the (shape[0], numel / shape[0]) view of a tensor with ndim >= 2.
inline int64_t lowrank_cols(const at::Tensor& p) { return p.size(0) ? p.numel() / p.size(0) : 0; }

// Validate the arguments of _lowrank_axpy_native for tensors on `device`.
inline void check_lowrank_args(at::TensorList params, at::IntArrayRef keys_u, at::ArrayRef<double> alphas,
                               at::ArrayRef<double> undo, at::TensorList dense, at::TensorList planes,
                               int64_t plane_bits, int64_t rank, int64_t stochastic, at::IntArrayRef tensor_ids,
                               at::IntArrayRef offsets, c10::DeviceType device) {
  const size_t n_t = params.size();
  TORCH_CHECK(undo.empty() || undo.size() == keys_u.size(), "_lowrank_axpy_native: ", keys_u.size(),
              " keys but ", undo.size(), " undo coefficients");
  TORCH_CHECK(rank >= 1 && rank <= LOWRANK_MAX_RANK, "_lowrank_axpy_native: rank ", rank, " is outside [1, ",
              LOWRANK_MAX_RANK, "]");
  if (!planes.empty()) {
    TORCH_CHECK(!undo.empty(), "_lowrank_axpy_native: planes need the exact form (undo)");
    check_exact_args(params, keys_u, alphas, undo, planes, plane_bits, stochastic, tensor_ids, offsets, device);
  } else {
    check_axpy_args(params, keys_u, alphas, {}, stochastic, tensor_ids, offsets, device);
  }
  TORCH_CHECK(dense.empty() || dense.size() == n_t, "_lowrank_axpy_native: ", dense.size(), " dense tensors for ",
              n_t, " params");
  for (size_t i = 0; i < n_t; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.dim() >= 2, "params[", i, "] has ", p.dim(), " dims; the low-rank pass takes ndim >= 2");
    const int64_t n = lowrank_cols(p);
    TORCH_CHECK(n == 0 || offsets[i] % n == 0, "offsets[", i, "]=", offsets[i], " is not a multiple of the row length ",
                n);
    if (!dense.empty()) {
      const at::Tensor& d = dense[i];
      TORCH_CHECK(d.device() == p.device() && d.scalar_type() == at::kFloat && d.is_contiguous() &&
                      d.numel() == p.size(0) * rank,
                  "dense[", i, "] must be a contiguous float32 (", p.size(0), ", ", rank, ") tensor on ", p.device());
    }
  }
}

// One checked call of _lowrank_axpy_native: the pass's fields (kt: the U keys), the V key and the rank.
struct LowrankCall : PassCall {
  int64_t key_v;
  int64_t rank;
};
using LowrankFn = void (*)(const LowrankCall&);

// _lowrank_axpy_native as registered for device DEV: check the arguments, then Run.
template <c10::DeviceType DEV, LowrankFn Run>
void lowrank_axpy_op(at::TensorList params, at::IntArrayRef keys_u, int64_t key_v, at::ArrayRef<double> alphas,
                     at::ArrayRef<double> undo, double gamma, at::TensorList dense, double beta, at::TensorList planes,
                     int64_t plane_bits, int64_t rank, int64_t stochastic, at::IntArrayRef tensor_ids,
                     at::IntArrayRef offsets, int64_t rounding_key) {
  check_lowrank_args(params, keys_u, alphas, undo, dense, planes, plane_bits, rank, stochastic, tensor_ids, offsets,
                     DEV);
  Run({{params, key_table(keys_u, alphas, undo), gamma, dense, beta, planes, plane_bits, stochastic, tensor_ids,
        offsets, rounding_key},
       key_v,
       rank});
}

// The scalars of a low-rank pass, the same in the CPU LowrankPass and the CUDA LowrankLaunch.
template <class A>
inline void set_lowrank_scalars(A& a, const LowrankCall& c) {
  a.rank = c.rank;
  a.gamma = (float)c.gamma;
  a.stochastic = c.stochastic != 0;
  split_key(c.rounding_key, a.rk0, a.rk1);
  a.invert = c.kt.invert;
  a.plane_mode = plane_mode(c.kt.invert, !c.planes.empty());
  a.plane_bits = (int)c.plane_bits;
}

}  // namespace zo
