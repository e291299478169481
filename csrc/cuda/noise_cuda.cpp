// CUDA glue of the native ops: checks, the device table, one launch per (param dtype, dense dtype)
// group on the current stream; registered for the CUDA dispatch key. Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

#include "../native_args.h"
#include "device_table.h"
#include "noise_kernel.h"

namespace zo {
namespace cuda {
namespace {

bool aligned4(const void* ptr, size_t elsize) { return ((uintptr_t)ptr % (4 * elsize)) == 0; }

// One launch over `idx` tensors: table (entries, keys, alphas, and in exact mode the undo coefficients)
// copied to the device in one transfer (device_table.h). `planes` (exact mode) are the residue planes, or empty.
void launch_group(const std::vector<size_t>& idx, at::TensorList params, at::TensorList dense,
                  at::IntArrayRef tensor_ids, at::IntArrayRef offsets,
                  const std::vector<uint32_t>& key_words, const std::vector<float>& alpha_f, LaunchArgs a,
                  at::TensorList planes = {}, const std::vector<float>& undo_f = {}) {
  const size_t T = idx.size();
  std::vector<Entry> entries(T);
  int64_t quads = 0;
  for (size_t r = 0; r < T; ++r) {
    const size_t i = idx[r];
    const at::Tensor& p = params[i];
    const at::Tensor* d = dense.empty() ? nullptr : &dense[i];
    Entry e;
    set_tensor_fields(e, p, tensor_ids[i], offsets[i]);
    e.d = d ? d->data_ptr() : nullptr;
    e.quad_start = quads;
    e.aligned = (e.off % 4 == 0) && aligned4(e.p, p.element_size()) && (!d || aligned4(e.d, d->element_size()));
    e.plane = planes.empty() || planes[i].numel() == 0 ? nullptr : planes[i].data_ptr<uint8_t>();
    e.plane_aligned = e.plane && ((uintptr_t)e.plane % (uintptr_t)(a.plane_bits / 2)) == 0;
    entries[r] = e;
    quads += quad_span(e.n, e.off);
  }
  if (quads == 0) return;
  const DeviceTable table({{entries.data(), T * sizeof(Entry)},
                           {key_words.data(), key_words.size() * sizeof(uint32_t)},
                           {alpha_f.data(), alpha_f.size() * sizeof(float)},
                           {undo_f.data(), undo_f.size() * sizeof(float)}},
                          params[idx[0]].device());
  a.table = table.get<Entry>(0);
  a.T = (int)T;
  a.keys = table.get<uint32_t>(1);
  a.alphas = table.get<float>(2);
  a.undo = undo_f.empty() ? nullptr : table.get<float>(3);
  a.total_quads = quads;
  C10_CUDA_CHECK(launch_noise(a, c10::cuda::getCurrentCUDAStream().stream()));
  // `table` returns to the caching allocator here; its reuse is ordered after the kernel on this stream.
}

void noise_axpy_cuda(at::TensorList params, at::IntArrayRef keys, at::ArrayRef<double> alphas, double gamma,
                     at::TensorList dense, double beta, int64_t stochastic, at::IntArrayRef tensor_ids,
                     at::IntArrayRef offsets, int64_t rounding_key) {
  check_axpy_args(params, keys, alphas, dense, stochastic, tensor_ids, offsets, c10::DeviceType::CUDA);
  if (params.empty()) return;
  check_same_device(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const KeyTable kt = key_table(keys, alphas);
  // One launch per (param dtype, dense dtype) group, like the Triton kernel.
  std::map<std::pair<int, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i)
    groups[{dtype_code(params[i].scalar_type()), dense.empty() ? NONE : dtype_code(dense[i].scalar_type())}]
        .push_back(i);
  for (const auto& kv : groups) {
    LaunchArgs a{};
    set_axpy_scalars(a, (int)keys.size(), gamma, beta, stochastic, rounding_key);
    a.pdt = kv.first.first;
    a.ddt = kv.first.second;
    launch_group(kv.second, params, dense, tensor_ids, offsets, kt.words, kt.alphas, a);
  }
}

// The exact-restore form (zo_kernels.restore; rules in ../restore.h): one launch per param dtype.
void noise_axpy_exact_cuda(at::TensorList params, at::IntArrayRef keys, at::ArrayRef<double> alphas,
                           at::ArrayRef<double> undo, double gamma, at::TensorList planes, int64_t plane_bits,
                           int64_t stochastic, at::IntArrayRef tensor_ids, at::IntArrayRef offsets,
                           int64_t rounding_key) {
  check_exact_args(params, keys, alphas, undo, planes, plane_bits, stochastic, tensor_ids, offsets,
                   c10::DeviceType::CUDA);
  if (params.empty()) return;
  check_same_device(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const KeyTable kt = key_table(keys, alphas, undo);
  std::map<int, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) groups[dtype_code(params[i].scalar_type())].push_back(i);
  for (const auto& kv : groups) {
    LaunchArgs a{};
    set_axpy_scalars(a, (int)keys.size(), gamma, 0.0, stochastic, rounding_key);
    a.pdt = kv.first;
    a.ddt = NONE;
    set_exact_mode(a, kt.invert, !planes.empty(), plane_bits);
    launch_group(kv.second, params, {}, tensor_ids, offsets, kt.words, kt.alphas, a, planes, kt.undo);
  }
}

void noise_cuda(const at::Tensor& out, int64_t key, int64_t tensor_id, int64_t offset, int64_t stream) {
  check_noise_args(out, tensor_id, offset, stream, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(out.device());
  std::vector<uint32_t> key_words(2);
  split_key(key, key_words[0], key_words[1]);
  const std::vector<float> alpha_f{1.0f};
  LaunchArgs a{};
  a.K = 1;
  a.pdt = dtype_code(out.scalar_type());
  a.ddt = NONE;
  a.has_x = 0;
  a.stream = (uint32_t)stream;
  const std::vector<at::Tensor> outs{out};
  const std::vector<int64_t> tids{tensor_id}, offs{offset};
  launch_group({0}, outs, {}, tids, offs, key_words, alpha_f, a);
}

}  // namespace
}  // namespace cuda
}  // namespace zo

TORCH_LIBRARY_IMPL(zo_kernels, CUDA, m) {
  zo::impl_noise_ops(m, &zo::cuda::noise_axpy_cuda, &zo::cuda::noise_cuda, &zo::cuda::noise_axpy_exact_cuda);
}
