// CPU kernel of the low-rank pass: declarations shared by the glue (lowrank_cpu.cpp) and the body compiled
// once per instruction set (lowrank_isa.h inside kernel_<isa>.cpp). No torch headers.
#pragma once

#include <stdint.h>

namespace zo {
namespace cpu {

constexpr int LR_QUADS = 16;             // quads per block
constexpr int LR_BLOCK = 4 * LR_QUADS;   // elements per block

// out[e] = z(key, tid, offset + e, stream) for e in [0, count), in blocks of 16 global quads.
struct NormalsJob {
  float* out;
  int64_t count;
  int64_t offset;
  uint32_t k0, k1, tid, stream;
};

// One tensor of the pass: theta (rows x cols view) and its factors (W, Wu: rows x r; Vt: r x cols).
struct LowrankTask {
  void* p;
  uint8_t* plane;      // residue plane, or nullptr
  int64_t numel;
  int64_t cols;
  int64_t off;         // global index of element 0
  uint32_t tid;
  int pdt;             // DType of p (F32, BF16, F16)
  const float* w;
  const float* wu;     // when inverting, else nullptr
  const float* vt;
};

struct LowrankPass {
  int64_t rank;
  float gamma;
  bool stochastic;
  uint32_t rk0, rk1;
  bool invert;         // some undo != 0
  int plane_mode;      // 0 none, 1 write residues (not inverting), 2 read them (inverting)
  int plane_bits;
};

// Blocks of 16 quads of the normals job / of one tensor's pass, [b0, b1).
using NormalsFn = void (*)(const NormalsJob&, int64_t b0, int64_t b1);
using LowrankFn = void (*)(const LowrankPass&, const LowrankTask&, int64_t b0, int64_t b1);

#define ZO_LOWRANK_DECLARE(isa)                                                   \
  namespace isa {                                                                 \
  void lowrank_normals(const NormalsJob&, int64_t, int64_t);                      \
  void lowrank_run(const LowrankPass&, const LowrankTask&, int64_t, int64_t);     \
  }
ZO_LOWRANK_DECLARE(base)
ZO_LOWRANK_DECLARE(avx2)
ZO_LOWRANK_DECLARE(avx512)
#undef ZO_LOWRANK_DECLARE

// The instruction set the kernels run with (noise_cpu.cpp): 0 base, 1 avx2, 2 avx512.
int selected_isa();

}  // namespace cpu
}  // namespace zo
