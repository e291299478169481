// Checks and unpacking of _noise_adam_native's arguments, shared by the CPU and CUDA glue (torch side).
#pragma once

#include <ATen/ATen.h>

#include "adam.h"
#include "native_args.h"

namespace zo {

inline void check_adam_state(const at::Tensor& s, const at::Tensor& p, const char* what, size_t i) {
  TORCH_CHECK(s.device() == p.device(), what, "[", i, "] is on ", s.device(), " but params[", i, "] on ", p.device());
  TORCH_CHECK(s.scalar_type() == at::kFloat, what, "[", i, "] has dtype ", s.scalar_type(),
              "; the native Adam pass keeps float32 states");
  TORCH_CHECK(s.is_contiguous(), what, "[", i, "] is not contiguous");
  TORCH_CHECK(s.numel() == p.numel(), what, "[", i, "] has ", s.numel(), " elements, params[", i, "] ", p.numel());
}

// The fields of tensor i that the CPU AdamTask and the CUDA AdamEntry share: θ, m, v, size, offset, id.
template <class Row>
inline void set_adam_fields(Row& r, at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::IntArrayRef tensor_ids, at::IntArrayRef offsets, size_t i) {
  set_tensor_fields(r, params[i], tensor_ids[i], offsets[i]);
  r.m = exp_avgs[i].data_ptr<float>();
  r.v = exp_avg_sqs[i].data_ptr<float>();
}

// Validate the arguments of _noise_adam_native for tensors on `device`; returns the per-call scalars.
inline AdamCoef check_adam_args(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                at::IntArrayRef keys, at::ArrayRef<double> coeffs, at::ArrayRef<double> scalars,
                                int64_t stochastic, at::IntArrayRef tensor_ids, at::IntArrayRef offsets,
                                c10::DeviceType device) {
  check_axpy_args(params, keys, coeffs, {}, stochastic, tensor_ids, offsets, device);
  const size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n, "_noise_adam_native: ", n, " params but ",
              exp_avgs.size(), " exp_avgs and ", exp_avg_sqs.size(), " exp_avg_sqs");
  TORCH_CHECK(scalars.size() == 7, "_noise_adam_native: scalars are (beta1, beta2, eps, step_size, bc2_sqrt, l2, "
              "gamma), got ", scalars.size());
  for (size_t i = 0; i < n; ++i) {
    check_adam_state(exp_avgs[i], params[i], "exp_avgs", i);
    check_adam_state(exp_avg_sqs[i], params[i], "exp_avg_sqs", i);
  }
  const double b1 = scalars[0], b2 = scalars[1];
  return AdamCoef{(float)b1, (float)(1.0 - b1), (float)b2, (float)(1.0 - b2), (float)scalars[2], (float)scalars[3],
                  (float)scalars[4], (float)scalars[5], (float)scalars[6]};
}

}  // namespace zo
