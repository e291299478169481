// CPU glue of the native ops: checks, the task table, at::parallel_for over 64-element blocks,
// and the run-time choice of instruction set (kernel_<isa>.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <vector>

#include "../native_args.h"
#include "kernel.h"
#include "lowrank_kernel.h"

namespace zo {
namespace cpu {

namespace {

// Blocks (64 elements) per parallel chunk at least: below this a call runs on one thread.
constexpr int64_t GRAIN_BLOCKS = 256;

enum Isa : int { ISA_BASE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
const char* const ISA_NAMES[] = {"base", "avx2", "avx512"};

// The best instruction set this CPU runs, capped by PyTorch's own choice (ATEN_CPU_CAPABILITY).
int best_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  const std::string torch_cap = at::get_cpu_capability();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512 && torch_cap.find("AVX512") != std::string::npos) return ISA_AVX512;
  if (avx2 && (torch_cap.find("AVX2") != std::string::npos || torch_cap.find("AVX512") != std::string::npos))
    return ISA_AVX2;
#endif
  return ISA_BASE;
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

BlockFn kernel() {
  switch (current_isa().load(std::memory_order_relaxed)) {
    case ISA_AVX512: return &avx512::run;
    case ISA_AVX2: return &avx2::run;
    default: return &base::run;
  }
}

Task make_task(const at::Tensor& p, const at::Tensor* d, int64_t tid, int64_t off, int64_t first) {
  Task t;
  set_tensor_fields(t, p, tid, off);
  t.d = d ? d->data_ptr() : nullptr;
  t.s = nullptr;
  t.sdt = F32;
  t.pdt = dtype_code(p.scalar_type());
  t.ddt = d ? dtype_code(d->scalar_type()) : NONE;
  t.plane = nullptr;
  t.first = first;
  t.blocks = (quad_span(t.n, off) + QUADS - 1) / QUADS;
  return t;
}

void launch(const Args& args, int64_t total_blocks) {
  const BlockFn fn = kernel();
  at::parallel_for(0, total_blocks, GRAIN_BLOCKS, [&](int64_t b0, int64_t b1) { fn(args, b0, b1); });
}

// The tasks of a pass's params (with their dense terms, scales and residue planes where it has them), in block
// order; `total` gets the blocks of all.
std::vector<Task> make_tasks(const PassCall& c, int64_t& total) {
  std::vector<Task> tasks;
  tasks.reserve(c.params.size());
  total = 0;
  for (size_t i = 0; i < c.params.size(); ++i) {
    tasks.push_back(make_task(c.params[i], c.dense.empty() ? nullptr : &c.dense[i], c.tensor_ids[i], c.offsets[i],
                              total));
    if (!c.scale.empty()) {
      tasks.back().s = c.scale[i].data_ptr();
      tasks.back().sdt = dtype_code(c.scale[i].scalar_type());
    }
    if (!c.planes.empty()) tasks.back().plane = c.planes[i].numel() ? c.planes[i].data_ptr<uint8_t>() : nullptr;
    total += tasks.back().blocks;
  }
  return tasks;
}

// The arguments of a noise_axpy_ pass over `tasks` (the exact form adds its own fields).
Args axpy_args(const std::vector<Task>& tasks, const PassCall& c) {
  Args a{};
  a.tasks = tasks.data();
  a.ntasks = (int)tasks.size();
  a.keys = c.kt.words.data();
  a.alphas = c.kt.alphas.data();
  set_axpy_scalars(a, (int)c.kt.alphas.size(), c.gamma, c.beta, c.stochastic, c.rounding_key, c.noise);
  return a;
}

void noise_axpy_cpu(const PassCall& c) {
  int64_t total;
  const std::vector<Task> tasks = make_tasks(c, total);
  launch(axpy_args(tasks, c), total);
}

// The exact-restore form (zo_kernels.restore; rules in ../restore.h): one parallel loop over the blocks
// of every tensor, like noise_axpy_cpu. Each block owns whole quads, hence whole plane words.
void noise_axpy_exact_cpu(const PassCall& c) {
  int64_t total;
  const std::vector<Task> tasks = make_tasks(c, total);
  Args a = axpy_args(tasks, c);
  a.undo = c.kt.undo.data();
  set_exact_mode(a, c.kt.invert, !c.planes.empty(), c.plane_bits);
  launch(a, total);
}

void noise_cpu(const at::Tensor& out, int64_t key, int64_t tensor_id, int64_t offset, int64_t stream,
               int64_t noise) {
  Task t = make_task(out, nullptr, tensor_id, offset, 0);
  uint32_t kw[2];
  split_key(key, kw[0], kw[1]);
  const float one = 1.0f;
  Args a{};
  a.tasks = &t;
  a.ntasks = 1;
  a.keys = kw;
  a.alphas = &one;
  a.K = 1;
  a.gamma = 0.0f;
  a.beta = 0.0f;
  a.has_x = false;
  a.stochastic = false;
  a.stream = (uint32_t)stream;
  a.noise = (int)noise;
  a.rk0 = a.rk1 = 0;
  launch(a, t.blocks);
}

}  // namespace

int selected_isa() { return current_isa().load(std::memory_order_relaxed); }

std::string cpu_isa(const std::string& request) {
  if (!request.empty()) {
    int want = -1;
    for (int i = 0; i < 3; ++i)
      if (request == ISA_NAMES[i]) want = i;
    TORCH_CHECK(want >= 0, "unknown instruction set '", request, "'; choose base, avx2 or avx512");
    TORCH_CHECK(want <= best_isa(), "instruction set '", request, "' is not available on this CPU (best: ",
                ISA_NAMES[best_isa()], ")");
    current_isa().store(want);
  }
  return ISA_NAMES[current_isa().load()];
}

}  // namespace cpu
}  // namespace zo

TORCH_LIBRARY_IMPL(zo_kernels, CPU, m) {
  zo::impl_noise_ops<c10::DeviceType::CPU, &zo::cpu::noise_axpy_cpu, &zo::cpu::noise_cpu,
                     &zo::cpu::noise_axpy_exact_cpu>(m);
}
