// CPU kernel of the fused ZO-Adam pass: declarations shared by the glue (adam_cpu.cpp) and the body
// compiled once per instruction set (adam_isa.h inside kernel_<isa>.cpp). No torch headers.
#pragma once

#include <stdint.h>

#include "../adam.h"

namespace zo {
namespace cpu {

constexpr int ADAM_QUADS = 16;               // quads per block (the full-rank kernel's blocks)
constexpr int ADAM_BLOCK = 4 * ADAM_QUADS;   // elements per block

// One tensor of the pass: theta (p), its states m and v (float32), counted from global element `off`.
struct AdamTask {
  void* p;
  float* m;
  float* v;
  int64_t n, off, first, blocks;   // elements; global index of element 0; its block range in the call
  uint32_t tid;
  int pdt;                         // DType of p (F32, BF16, F16)
};

// The per-call values every block reads.
struct AdamPass {
  const uint32_t* keys;  // 2 K words
  const float* coeffs;   // K
  int K;
  AdamCoef c;
  bool stochastic;
  uint32_t rk0, rk1;
  int noise;             // NOISE_GAUSSIAN or NOISE_RADEMACHER (../philox.h)
};

// Blocks [b0, b1) of one tensor's pass.
using AdamFn = void (*)(const AdamPass&, const AdamTask&, int64_t b0, int64_t b1);

namespace base { void adam_run(const AdamPass&, const AdamTask&, int64_t, int64_t); }
namespace avx2 { void adam_run(const AdamPass&, const AdamTask&, int64_t, int64_t); }
namespace avx512 { void adam_run(const AdamPass&, const AdamTask&, int64_t, int64_t); }

// The instruction set the kernels run with (noise_cpu.cpp): 0 base, 1 avx2, 2 avx512.
int selected_isa();

}  // namespace cpu
}  // namespace zo
