// CPU kernel of the primitive: shared declarations (no torch headers; see noise_cpu.cpp for the glue).
//
//   theta_t <- gamma * theta_t + sum_j alpha_j * z(key_j, t) + beta * dense_t      (fp32, one rounding)
//
// (with Task::s, the scaled form of docs/spec.md §10: z_j is fmul(sigma_t, z_j) everywhere, both forms)
// (z: normals, or with Args::noise == NOISE_RADEMACHER the signs of docs/spec.md §9) and its exact-restore
// form (Args::exact; zo_kernels/restore.py, the rules in ../restore.h):
//
//   theta0 <- invert(theta_t, sum_j undo_j z_j [, plane residue])   (when some undo_j != 0)
//   plane_t <- residues of theta0                                    (when undo is all zero, planes given)
//   theta_t <- round(gamma * theta0 + sum_j alpha_j z_j)
//
// Work is cut into blocks of 16 quads (64 elements) counted from each tensor's first quad
// (offset / 4); the parallel loop runs over the concatenated block ranges of all tensors. Every
// element's value depends only on (key, tensor id, global index), never on the block or thread.
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>  // kernel_isa.h: compile-time modes

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // before any #pragma GCC target: the intrinsics of kernel_isa.h
#endif

#include "../philox.h"
#include "../restore.h"

namespace zo {
namespace cpu {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2, U32 = 3, NONE = 4 };

constexpr int QUADS = 16;              // quads per block (one vector of uint32 lanes on AVX-512)
constexpr int BLOCK = 4 * QUADS;       // elements per block

struct Task {
  void* p;           // parameter (or output) data
  const void* d;     // dense term data, or nullptr
  const void* s;     // the scaled form's sigma (n elements; docs/spec.md §10), or nullptr: sigma = 1
  int sdt;           // DType of s: F32 or BF16 (widened to float32 exactly)
  int64_t n;         // elements
  int64_t off;       // global index of element 0
  uint32_t tid;      // tensor id in the counter
  int pdt;           // DType of p
  int ddt;           // DType of d (NONE without a dense term)
  uint8_t* plane;    // exact mode: the residue plane (one word per quad from offset / 4), or nullptr
  int64_t first;     // index of this tensor's first block in the concatenated block range
  int64_t blocks;    // number of blocks
};

struct Args {
  const Task* tasks;
  int ntasks;
  const uint32_t* keys;    // 2 * K words: k0, k1 of each key
  const float* alphas;     // K
  int K;
  float gamma;
  float beta;
  bool has_x;              // false: out = z of keys[0] (noise_), or the raw words when pdt == U32
  bool stochastic;         // stochastic rounding for bf16 / fp16 outputs
  uint32_t stream;         // Philox stream of the noise (0 for noise_axpy_, 5 with Rademacher signs)
  int noise;               // NOISE_GAUSSIAN or NOISE_RADEMACHER (../philox.h)
  uint32_t rk0, rk1;       // rounding key
  // Exact-restore form (no dense term, has_x true):
  bool exact;              // run the exact form
  const float* undo;       // K coefficients of the perturbation theta carries now
  bool invert;             // some undo != 0: invert the rounding first
  int plane_mode;          // 0: no planes, 1: write residues (not inverting), 2: read them (inverting)
  int plane_bits;          // 2, 4 or 8
};

// Process the concatenated blocks [b0, b1) of args' tasks.
using BlockFn = void (*)(const Args&, int64_t b0, int64_t b1);

namespace base { void run(const Args&, int64_t, int64_t); }
namespace avx2 { void run(const Args&, int64_t, int64_t); }
namespace avx512 { void run(const Args&, int64_t, int64_t); }

}  // namespace cpu
}  // namespace zo
