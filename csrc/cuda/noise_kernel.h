// CUDA kernel of the primitive: the host-side interface (plain C++ and the CUDA runtime API, no torch;
// noise_cuda.cpp is the torch glue, noise_kernel.cu the kernels).
//
//   theta_t <- gamma * theta_t + sum_j alpha_j * z(key_j, t) + beta * dense_t      (fp32, one rounding)
//
// and its exact-restore form (LaunchArgs::exact; zo_kernels/restore.py, the rules in ../restore.h):
// theta0 <- invert(theta_t, sum_j undo_j z_j [, plane residue]) when some undo_j != 0, else the residue
// plane is written from theta0 = theta_t (when given); then theta_t <- round(gamma theta0 + sum_j alpha_j z_j).
// With Entry::s (the scaled form, docs/spec.md §10) z_j is fmul(sigma, z_j) in both forms.
//
// One launch covers every tensor of a (param dtype, dense dtype) group: a device table of Entry
// rows (pointer/size table) and a grid-stride loop over each tensor's quads; each thread makes one
// Philox call per quad of 4 elements (vector loads and stores where the quad is aligned).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace zo {
namespace cuda {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2, U32 = 3, NONE = 4 };

struct Entry {
  void* p;             // parameter (output) data
  const void* d;       // dense term, or nullptr
  const void* s;       // the scaled form's sigma (docs/spec.md §10), or nullptr: sigma = 1
  int64_t n;           // elements
  int64_t off;         // global index of element 0
  int64_t quad_start;  // quads of the earlier tensors of the launch (spreads small tensors over threads)
  uint32_t tid;        // tensor id in the counter
  uint32_t aligned;    // p (and d, s) aligned to 4 elements and off % 4 == 0: vector loads / stores
  uint8_t* plane;      // exact mode: the residue plane (one word per quad from off / 4), or nullptr
  uint32_t plane_aligned;  // plane aligned to its word size: one load / store per word
  uint32_t sdt;        // DType of s: F32 or BF16 (widened to float32 exactly)
};

struct LaunchArgs {
  const Entry* table;      // device: T entries
  int T;
  const uint32_t* keys;    // device: 2 K words (k0, k1 of each key)
  const float* alphas;     // device: K
  int K;
  float gamma;
  float beta;
  int pdt;                 // DType of every p of the launch (U32: raw words, noise_ only)
  int ddt;                 // DType of every d (NONE: no dense term)
  int has_x;               // 0: out = z of keys[0] (noise_), or the raw words when pdt == U32
  int stochastic;          // stochastic rounding for bf16 / fp16
  uint32_t stream;         // Philox stream of the noise
  int noise;               // NOISE_GAUSSIAN or NOISE_RADEMACHER (../philox.h; docs/spec.md §9)
  uint32_t rk0, rk1;       // rounding key
  int64_t total_quads;     // sum of the tensors' quads (sizes the grid)
  // Exact-restore form (no dense term, has_x 1):
  int exact;               // run the exact-form kernel
  const float* undo;       // device: K coefficients of the perturbation theta carries now
  int invert;              // some undo != 0: invert the rounding first
  int plane_mode;          // 0: no planes, 1: write residues (not inverting), 2: read them (inverting)
  int plane_bits;          // 2, 4 or 8
};

// Enqueue the kernel on `stream`; returns the launch error (cudaSuccess when queued).
cudaError_t launch_noise(const LaunchArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace zo
