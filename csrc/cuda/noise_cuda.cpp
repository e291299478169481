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

// One launch over the `idx` tensors of call c: table (entries, keys, alphas, and in exact mode the undo
// coefficients) copied to the device in one transfer (device_table.h).
void launch_group(const std::vector<size_t>& idx, const PassCall& c, LaunchArgs a) {
  const size_t T = idx.size();
  std::vector<Entry> entries(T);
  int64_t quads = 0;
  for (size_t r = 0; r < T; ++r) {
    const size_t i = idx[r];
    const at::Tensor& p = c.params[i];
    const at::Tensor* d = c.dense.empty() ? nullptr : &c.dense[i];
    Entry e;
    set_tensor_fields(e, p, c.tensor_ids[i], c.offsets[i]);
    e.d = d ? d->data_ptr() : nullptr;
    e.s = c.scale.empty() ? nullptr : c.scale[i].data_ptr();
    e.sdt = c.scale.empty() ? F32 : dtype_code(c.scale[i].scalar_type());
    e.quad_start = quads;
    e.aligned = (e.off % 4 == 0) && aligned4(e.p, p.element_size()) && (!d || aligned4(e.d, d->element_size())) &&
                (!e.s || aligned4(e.s, c.scale[i].element_size()));
    e.plane = c.planes.empty() || c.planes[i].numel() == 0 ? nullptr : c.planes[i].data_ptr<uint8_t>();
    e.plane_aligned = e.plane && ((uintptr_t)e.plane % (uintptr_t)(a.plane_bits / 2)) == 0;
    entries[r] = e;
    quads += quad_span(e.n, e.off);
  }
  if (quads == 0) return;
  const std::vector<float>& undo = c.kt.undo;
  const DeviceTable table({{entries.data(), T * sizeof(Entry)},
                           {c.kt.words.data(), c.kt.words.size() * sizeof(uint32_t)},
                           {c.kt.alphas.data(), c.kt.alphas.size() * sizeof(float)},
                           {undo.data(), undo.size() * sizeof(float)}},
                          c.params[idx[0]].device());
  a.table = table.get<Entry>(0);
  a.T = (int)T;
  a.keys = table.get<uint32_t>(1);
  a.alphas = table.get<float>(2);
  a.undo = undo.empty() ? nullptr : table.get<float>(3);
  a.total_quads = quads;
  C10_CUDA_CHECK(launch_noise(a, c10::cuda::getCurrentCUDAStream().stream()));
  // `table` returns to the caching allocator here; its reuse is ordered after the kernel on this stream.
}

// One launch per (param dtype, dense dtype) group, like the Triton kernel.
void noise_axpy_cuda(const PassCall& c) {
  if (c.params.empty()) return;
  const c10::cuda::CUDAGuard guard(launch_device(c.params));
  const auto groups = launch_groups(c.params, [&](size_t i) {
    return std::make_pair(dtype_code(c.params[i].scalar_type()),
                          c.dense.empty() ? (int)NONE : dtype_code(c.dense[i].scalar_type()));
  });
  for (const auto& kv : groups) {
    LaunchArgs a{};
    set_axpy_scalars(a, (int)c.kt.alphas.size(), c.gamma, c.beta, c.stochastic, c.rounding_key, c.noise);
    a.pdt = kv.first.first;
    a.ddt = kv.first.second;
    launch_group(kv.second, c, a);
  }
}

// The exact-restore form (zo_kernels.restore; rules in ../restore.h): one launch per param dtype.
void noise_axpy_exact_cuda(const PassCall& c) {
  if (c.params.empty()) return;
  const c10::cuda::CUDAGuard guard(launch_device(c.params));
  const auto groups = launch_groups(c.params, [&](size_t i) { return dtype_code(c.params[i].scalar_type()); });
  for (const auto& kv : groups) {
    LaunchArgs a{};
    set_axpy_scalars(a, (int)c.kt.alphas.size(), c.gamma, 0.0, c.stochastic, c.rounding_key, c.noise);
    a.pdt = kv.first;
    a.ddt = NONE;
    set_exact_mode(a, c.kt.invert, !c.planes.empty(), c.plane_bits);
    launch_group(kv.second, c, a);
  }
}

void noise_cuda(const at::Tensor& out, int64_t key, int64_t tensor_id, int64_t offset, int64_t stream,
                int64_t noise) {
  const c10::cuda::CUDAGuard guard(out.device());
  const double one = 1.0;
  const std::vector<at::Tensor> outs{out};
  const PassCall c{outs, key_table(key, one), 0.0, {}, 0.0, {}, 0, 0, tensor_id, offset, 0};
  LaunchArgs a{};
  a.K = 1;
  a.pdt = dtype_code(out.scalar_type());
  a.ddt = NONE;
  a.has_x = 0;
  a.stream = (uint32_t)stream;
  a.noise = (int)noise;
  launch_group({0}, c, a);
}

}  // namespace
}  // namespace cuda
}  // namespace zo

TORCH_LIBRARY_IMPL(zo_kernels, CUDA, m) {
  zo::impl_noise_ops<c10::DeviceType::CUDA, &zo::cuda::noise_axpy_cuda, &zo::cuda::noise_cuda,
                     &zo::cuda::noise_axpy_exact_cuda>(m);
}
