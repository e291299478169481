// Checks and unpacking shared by the CPU and CUDA glue of the native ops (torch side only).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "philox.h"

namespace zo {

// zo-noise dtype codes, the same numbering as zo::cpu::DType.
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    case at::kInt: return 3;
    default: return -1;
  }
}

// 64-bit key (int64 two's complement of the unsigned key) -> (k0, k1).
inline void split_key(int64_t key, uint32_t& k0, uint32_t& k1) {
  const uint64_t u = (uint64_t)key;
  k0 = (uint32_t)u;
  k1 = (uint32_t)(u >> 32);
}

// The keys as (k0, k1) word pairs and their coefficients in float, as the kernels take them; for the
// exact form also the undo coefficients, and `invert` when any of them is nonzero.
struct KeyTable {
  std::vector<uint32_t> words;
  std::vector<float> alphas, undo;
  bool invert = false;
};

// Quads (4-element Philox groups) that n elements from global element offset `off` touch.
inline int64_t quad_span(int64_t n, int64_t off) { return n ? (off + n + 3) / 4 - off / 4 : 0; }

// The fields every native backend's per-tensor row carries (CPU Task and AdamTask, CUDA Entry and
// AdamEntry): p's data and element count, its global element offset and tensor id.
template <class Row>
inline void set_tensor_fields(Row& r, const at::Tensor& p, int64_t tensor_id, int64_t offset) {
  r.p = p.data_ptr();
  r.n = p.numel();
  r.off = offset;
  r.tid = (uint32_t)tensor_id;
}

// The scalars of a noise_axpy_ pass, the same in the CPU Args and the CUDA LaunchArgs.
template <class A>
inline void set_axpy_scalars(A& a, int K, double gamma, double beta, int64_t stochastic, int64_t rounding_key,
                             int64_t noise) {
  a.K = K;
  a.gamma = (float)gamma;
  a.beta = (float)beta;
  a.has_x = true;
  a.stochastic = stochastic != 0;
  a.stream = noise_stream((int)noise);
  a.noise = (int)noise;
  split_key(rounding_key, a.rk0, a.rk1);
}

// The `noise` argument of the native ops: NOISE_GAUSSIAN or NOISE_RADEMACHER (zo_kernels/native.py).
inline void check_noise(int64_t noise) {
  TORCH_CHECK(noise == NOISE_GAUSSIAN || noise == NOISE_RADEMACHER, "noise must be ", NOISE_GAUSSIAN,
              " (gaussian) or ", NOISE_RADEMACHER, " (rademacher), got ", noise);
}

// The exact form's plane mode (rules in restore.h): with residue planes, read them when inverting (2),
// else write them (1); 0 without planes.
inline int plane_mode(bool invert, bool has_planes) { return has_planes ? (invert ? 2 : 1) : 0; }

// The exact form's switches: invert when some undo coefficient is nonzero; the plane mode.
template <class A>
inline void set_exact_mode(A& a, bool invert, bool has_planes, int64_t plane_bits) {
  a.exact = true;
  a.invert = invert;
  a.plane_mode = plane_mode(invert, has_planes);
  a.plane_bits = (int)plane_bits;
}

inline KeyTable key_table(at::IntArrayRef keys, at::ArrayRef<double> alphas, at::ArrayRef<double> undo = {}) {
  KeyTable t;
  t.words.resize(2 * keys.size());
  t.alphas.resize(alphas.size());
  t.undo.resize(undo.size());
  for (size_t j = 0; j < keys.size(); ++j) {
    split_key(keys[j], t.words[2 * j], t.words[2 * j + 1]);
    t.alphas[j] = (float)alphas[j];
    if (!undo.empty()) {
      t.undo[j] = (float)undo[j];
      t.invert = t.invert || undo[j] != 0.0;
    }
  }
  return t;
}

inline void check_id(int64_t v, const char* what, size_t i) {
  TORCH_CHECK(v >= 0 && v < (int64_t(1) << 32), what, "[", i, "]=", v, " is outside [0, 2**32)");
}

inline void check_offset(int64_t v, size_t i) {
  TORCH_CHECK(v >= 0 && v < (int64_t(1) << 62), "offsets[", i, "]=", v, " is outside [0, 2**62)");
}

// Validate the arguments of _noise_axpy_native for tensors on `device`.
inline void check_axpy_args(at::TensorList params, at::IntArrayRef keys, at::ArrayRef<double> alphas,
                            at::TensorList dense, int64_t stochastic, at::IntArrayRef tensor_ids,
                            at::IntArrayRef offsets, c10::DeviceType device) {
  const size_t n = params.size();
  TORCH_CHECK(keys.size() == alphas.size(), "_noise_axpy_native: ", keys.size(), " keys but ", alphas.size(),
              " alphas");
  TORCH_CHECK(tensor_ids.size() == n && offsets.size() == n, "_noise_axpy_native: ", n, " params but ",
              tensor_ids.size(), " tensor_ids and ", offsets.size(), " offsets");
  TORCH_CHECK(dense.empty() || dense.size() == n, "_noise_axpy_native: ", dense.size(), " dense tensors for ", n,
              " params");
  TORCH_CHECK(stochastic == 0 || stochastic == 1, "_noise_axpy_native: stochastic must be 0 or 1");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().type() == device, "params[", i, "] is on ", p.device(), ", expected ", device);
    TORCH_CHECK(p.is_contiguous(), "params[", i, "] is not contiguous");
    const int code = dtype_code(p.scalar_type());
    TORCH_CHECK(code >= 0 && code <= 2, "params[", i, "] has dtype ", p.scalar_type(),
                "; the native kernels take float32, bfloat16, float16");
    if (!dense.empty()) {
      const at::Tensor& d = dense[i];
      TORCH_CHECK(d.device() == p.device(), "dense[", i, "] is on ", d.device(), " but params[", i, "] on ",
                  p.device());
      TORCH_CHECK(d.is_contiguous(), "dense[", i, "] is not contiguous");
      TORCH_CHECK(d.numel() == p.numel(), "dense[", i, "] has ", d.numel(), " elements, params[", i, "] ",
                  p.numel());
      const int dc = dtype_code(d.scalar_type());
      TORCH_CHECK(dc >= 0 && dc <= 2, "dense[", i, "] has dtype ", d.scalar_type(),
                  "; the native kernels take float32, bfloat16, float16");
    }
    check_id(tensor_ids[i], "tensor_ids", i);
    check_offset(offsets[i], i);
  }
}

// Bytes of one tensor's residue plane (zo_kernels.restore.plane_numel_bytes).
inline int64_t plane_numel_bytes(int64_t numel, int64_t offset, int64_t bits) {
  if (numel == 0) return 0;
  return ((offset + numel + 3) / 4 - offset / 4) * bits / 2;
}

// Validate the arguments of _noise_axpy_exact_native for tensors on `device`.
inline void check_exact_args(at::TensorList params, at::IntArrayRef keys, at::ArrayRef<double> alphas,
                             at::ArrayRef<double> undo, at::TensorList planes, int64_t plane_bits,
                             int64_t stochastic, at::IntArrayRef tensor_ids, at::IntArrayRef offsets,
                             c10::DeviceType device) {
  check_axpy_args(params, keys, alphas, {}, stochastic, tensor_ids, offsets, device);
  const size_t n = params.size();
  TORCH_CHECK(undo.size() == keys.size(), "_noise_axpy_exact_native: ", keys.size(), " keys but ", undo.size(),
              " undo coefficients");
  TORCH_CHECK(plane_bits == 2 || plane_bits == 4 || plane_bits == 8,
              "_noise_axpy_exact_native: plane_bits must be 2, 4 or 8, got ", plane_bits);
  TORCH_CHECK(planes.empty() || planes.size() == n, "_noise_axpy_exact_native: ", planes.size(), " planes for ", n,
              " params");
  for (size_t i = 0; i < planes.size(); ++i) {
    const at::Tensor& pl = planes[i];
    TORCH_CHECK(pl.device() == params[i].device(), "planes[", i, "] is on ", pl.device(), " but params[", i, "] on ",
                params[i].device());
    TORCH_CHECK(pl.scalar_type() == at::kByte && pl.is_contiguous(), "planes[", i,
                "] must be a contiguous uint8 tensor (zo_kernels.restore.make_planes)");
    const int64_t want = plane_numel_bytes(params[i].numel(), offsets[i], plane_bits);
    TORCH_CHECK(pl.numel() == want, "planes[", i, "] has ", pl.numel(), " bytes; params[", i, "] at offset ",
                offsets[i], " needs ", want, " for ", plane_bits, "-bit residues");
  }
}

inline void check_noise_args(const at::Tensor& out, int64_t tensor_id, int64_t offset, int64_t stream,
                             c10::DeviceType device) {
  TORCH_CHECK(out.device().type() == device, "out is on ", out.device(), ", expected ", device);
  TORCH_CHECK(out.is_contiguous(), "out is not contiguous");
  TORCH_CHECK(dtype_code(out.scalar_type()) >= 0, "out has dtype ", out.scalar_type(),
              "; _noise_native fills float32, bfloat16, float16 (normals) or int32 (raw Philox words)");
  check_id(tensor_id, "tensor_id", 0);
  check_offset(offset, 0);
  check_id(stream, "stream", 0);
}

// One checked call of a multi-tensor pass (_noise_axpy_native, _noise_axpy_exact_native, and with
// LowrankCall's fields _lowrank_axpy_native; schemas in ops.cpp and cpu/lowrank_cpu.cpp), as the glue of
// every device takes it.
struct PassCall {
  at::TensorList params;
  KeyTable kt;               // the keys (the low-rank pass: its U keys) as words, their coefficients in float
  double gamma;
  at::TensorList dense;      // beta's dense term, or empty
  double beta;
  at::TensorList planes;     // the exact forms' residue planes, or empty
  int64_t plane_bits;
  int64_t stochastic;
  at::IntArrayRef tensor_ids, offsets;
  int64_t rounding_key;
  int64_t noise = NOISE_GAUSSIAN;  // the noise form (docs/spec.md §9); the low-rank pass is Gaussian
  at::TensorList scale = {};       // the scaled form's sigma, float32 / bfloat16, one per param (docs/spec.md §10), or empty
};
using PassFn = void (*)(const PassCall&);

// The scaled form's sigma (docs/spec.md §10): empty, or one contiguous float32 or bfloat16 tensor per param with
// its element count, on its device.
inline void check_scale(at::TensorList params, at::TensorList scale) {
  TORCH_CHECK(scale.empty() || scale.size() == params.size(), "scale has ", scale.size(), " tensors for ",
              params.size(), " params");
  for (size_t i = 0; i < scale.size(); ++i) {
    const at::Tensor& s = scale[i];
    TORCH_CHECK(s.device() == params[i].device(), "scale[", i, "] is on ", s.device(), " but params[", i, "] on ",
                params[i].device());
    TORCH_CHECK((s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16) && s.is_contiguous(), "scale[",
                i, "] must be a contiguous float32 or bfloat16 tensor");
    TORCH_CHECK(s.numel() == params[i].numel(), "scale[", i, "] has ", s.numel(), " elements, params[", i, "] ",
                params[i].numel());
  }
}

// The ops as registered for device DEV: check the arguments (before anything is written), then Run.
template <c10::DeviceType DEV, PassFn Run>
void noise_axpy_op(at::TensorList params, at::IntArrayRef keys, at::ArrayRef<double> alphas, double gamma,
                   at::TensorList dense, double beta, int64_t stochastic, at::IntArrayRef tensor_ids,
                   at::IntArrayRef offsets, int64_t rounding_key, int64_t noise, at::TensorList scale) {
  check_axpy_args(params, keys, alphas, dense, stochastic, tensor_ids, offsets, DEV);
  check_noise(noise);
  check_scale(params, scale);
  Run({params, key_table(keys, alphas), gamma, dense, beta, {}, 0, stochastic, tensor_ids, offsets, rounding_key,
       noise, scale});
}

template <c10::DeviceType DEV, PassFn Run>
void noise_axpy_exact_op(at::TensorList params, at::IntArrayRef keys, at::ArrayRef<double> alphas,
                         at::ArrayRef<double> undo, double gamma, at::TensorList planes, int64_t plane_bits,
                         int64_t stochastic, at::IntArrayRef tensor_ids, at::IntArrayRef offsets,
                         int64_t rounding_key, int64_t noise, at::TensorList scale) {
  check_exact_args(params, keys, alphas, undo, planes, plane_bits, stochastic, tensor_ids, offsets, DEV);
  check_noise(noise);
  check_scale(params, scale);
  Run({params, key_table(keys, alphas, undo), gamma, {}, 0.0, planes, plane_bits, stochastic, tensor_ids, offsets,
       rounding_key, noise, scale});
}

// out float: the noise of the form `noise` on `stream`; out int32: the raw words (the form is not used).
using NoiseFn = void (*)(const at::Tensor& out, int64_t key, int64_t tensor_id, int64_t offset, int64_t stream,
                         int64_t noise);

template <c10::DeviceType DEV, NoiseFn Run>
void noise_op(const at::Tensor& out, int64_t key, int64_t tensor_id, int64_t offset, int64_t stream, int64_t noise) {
  check_noise_args(out, tensor_id, offset, stream, DEV);
  check_noise(noise);
  Run(out, key, tensor_id, offset, stream, noise);
}

// Registers one device's glue of the native noise ops under its dispatch key.
template <c10::DeviceType DEV, PassFn Axpy, NoiseFn Noise, PassFn Exact>
inline void impl_noise_ops(torch::Library& m) {
  m.impl("_noise_axpy_native", &noise_axpy_op<DEV, Axpy>);
  m.impl("_noise_native", &noise_op<DEV, Noise>);
  m.impl("_noise_axpy_exact_native", &noise_axpy_exact_op<DEV, Exact>);
}

}  // namespace zo
