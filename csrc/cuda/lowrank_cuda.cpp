// CUDA glue of the low-rank pass: checks (../lowrank_args.h), the factor scratch, the device table, the
// factor launch and one pass launch per param dtype on the current stream; registered for the CUDA
// dispatch key. Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "../lowrank_args.h"
#include "device_table.h"
#include "lowrank_kernel.h"

namespace zo {
namespace cuda {
namespace {

void lowrank_axpy_cuda(const LowrankCall& c) {
  if (c.params.empty()) return;
  const c10::cuda::CUDAGuard guard(launch_device(c.params));
  const at::TensorList params = c.params;
  const KeyTable& kt = c.kt;
  const int64_t rank = c.rank;
  // Table rows grouped by param dtype, so each pass launch reads one contiguous slice.
  const auto groups = launch_groups(params, [&](size_t i) { return dtype_code(params[i].scalar_type()); });
  if (groups.empty()) return;
  int64_t scratch_floats = 0;
  for (const auto& kv : groups)
    for (size_t i : kv.second)
      scratch_floats += ((kt.invert ? 2 : 1) * params[i].size(0) + lowrank_cols(params[i])) * rank;
  const at::Tensor scratch = at::empty({scratch_floats}, params[0].options().dtype(at::kFloat));
  float* next = scratch.data_ptr<float>();
  std::vector<LowrankEntry> entries;
  struct Slice { int pdt; size_t start, count; int64_t quads; };
  std::vector<Slice> slices;
  int64_t fquads = 0;
  for (const auto& kv : groups) {
    Slice sl{kv.first, entries.size(), kv.second.size(), 0};
    for (size_t i : kv.second) {
      const at::Tensor& p = params[i];
      LowrankEntry e{};
      e.p = p.data_ptr();
      e.n = p.numel();
      e.rows = p.size(0);
      e.cols = lowrank_cols(p);
      e.off = c.offsets[i];
      e.quad_start = sl.quads;
      e.fquad_start = fquads;
      e.tid = (uint32_t)c.tensor_ids[i];
      e.aligned = (e.off % 4 == 0) && ((uintptr_t)e.p % (4 * p.element_size()) == 0);
      e.plane = c.planes.empty() || c.planes[i].numel() == 0 ? nullptr : c.planes[i].data_ptr<uint8_t>();
      e.plane_aligned = e.plane && ((uintptr_t)e.plane % (uintptr_t)(c.plane_bits / 2)) == 0;
      e.dense = c.dense.empty() ? nullptr : c.dense[i].data_ptr<float>();
      e.w = next;
      next += e.rows * rank;
      e.wu = kt.invert ? next : nullptr;
      next += kt.invert ? e.rows * rank : 0;
      e.vt = next;
      next += e.cols * rank;
      entries.push_back(e);
      sl.quads += quad_span(e.n, e.off);
      const int64_t u0 = (e.off / e.cols) * rank;  // the U stream's quads of the rows, then V's
      fquads += (u0 + e.rows * rank + 3) / 4 - u0 / 4 + (e.cols * rank + 3) / 4;
    }
    slices.push_back(sl);
  }
  const DeviceTable table({{entries.data(), entries.size() * sizeof(LowrankEntry)},
                           {kt.words.data(), kt.words.size() * sizeof(uint32_t)},
                           {kt.alphas.data(), kt.alphas.size() * sizeof(float)},
                           {kt.undo.data(), kt.invert ? kt.undo.size() * sizeof(float) : 0}},
                          params[0].device());
  LowrankLaunch a{};
  a.table = table.get<LowrankEntry>(0);
  a.T = (int)entries.size();
  a.keys = table.get<uint32_t>(1);
  a.alphas = table.get<float>(2);
  a.undo = kt.invert ? table.get<float>(3) : nullptr;
  a.K = (int)kt.alphas.size();
  split_key(c.key_v, a.kv0, a.kv1);
  a.beta = (float)c.beta;
  set_lowrank_scalars(a, c);
  a.total_fquads = fquads;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(launch_lowrank_factors(a, stream));
  for (const Slice& sl : slices) {
    LowrankLaunch b = a;
    b.table = a.table + sl.start;
    b.T = (int)sl.count;
    b.pdt = sl.pdt;
    b.total_quads = sl.quads;
    C10_CUDA_CHECK(launch_lowrank_pass(b, stream));
  }
  // `scratch` and the table return to the caching allocator here, reused only after these kernels.
}

}  // namespace
}  // namespace cuda
}  // namespace zo

TORCH_LIBRARY_IMPL(zo_kernels, CUDA, m) {
  m.impl("_lowrank_axpy_native", &zo::lowrank_axpy_op<c10::DeviceType::CUDA, &zo::cuda::lowrank_axpy_cuda>);
}
