// zo_kernels._C: the schemas of every native (internal) op, and the Python module stub.
//
// The public ops zo_kernels::noise_axpy_ / noise_ (zo_kernels/ops.py), noise_adam_ (zo_kernels/adam.py)
// and lowrank_noise_axpy_ (zo_kernels/lowrank.py) are Python custom ops; their "cpu" and "cuda" backends
// (zo_kernels/native.py) call these, whose CPU and CUDA dispatch keys get the kernels of csrc/cpu and
// csrc/cuda (each registers its implementations there, not a schema). Keys are int64 two's complement of
// the unsigned 64-bit key.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "philox.h"

namespace zo {
namespace cpu {
std::string cpu_isa(const std::string& request);  // noise_cpu.cpp
}
}  // namespace zo

namespace {
// Philox4x32-10 of one counter (4 words) and key (2 words), each word in [0, 2**32): philox.h's scalar
// function, for the Random123 known-answer vectors.
std::vector<int64_t> philox4x32(c10::IntArrayRef counter, c10::IntArrayRef key) {
  TORCH_CHECK(counter.size() == 4 && key.size() == 2, "_philox4x32_native takes 4 counter words and 2 key words");
  for (int64_t w : counter) TORCH_CHECK(w >= 0 && w <= 0xFFFFFFFFLL, "counter word ", w, " is not a uint32");
  for (int64_t w : key) TORCH_CHECK(w >= 0 && w <= 0xFFFFFFFFLL, "key word ", w, " is not a uint32");
  uint32_t c0 = (uint32_t)counter[0], c1 = (uint32_t)counter[1], c2 = (uint32_t)counter[2], c3 = (uint32_t)counter[3];
  zo::philox4x32_10(c0, c1, c2, c3, (uint32_t)key[0], (uint32_t)key[1]);
  return {c0, c1, c2, c3};
}

bool has_cuda() {
#if defined(ZO_WITH_CUDA)
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(zo_kernels, m) {
  // `noise`: the noise form, 0 Gaussian (docs/spec.md §1), 1 Rademacher signs (§9); every op but the low-rank one.
  // `scale`: the scaled form's sigma (docs/spec.md §10), one float32 tensor per param, or empty (sigma = 1).
  m.def("_noise_axpy_native(Tensor(a!)[] params, int[] keys, float[] alphas, float gamma, Tensor[] dense, "
        "float beta, int stochastic, int[] tensor_ids, int[] offsets, int rounding_key, int noise, "
        "Tensor[] scale) -> ()");
  // The exact-restore form (zo_kernels/restore.py, csrc/restore.h): undo the carried perturbation by
  // inverting its rounding (planes read), or record residues (planes written), then apply alphas.
  m.def("_noise_axpy_exact_native(Tensor(a!)[] params, int[] keys, float[] alphas, float[] undo, float gamma, "
        "Tensor(b!)[] planes, int plane_bits, int stochastic, int[] tensor_ids, int[] offsets, "
        "int rounding_key, int noise, Tensor[] scale) -> ()");
  // The fused ZO-Adam pass (zo_kernels/adam.py, csrc/adam.h): theta, m, v in one pass with g = sum_j c_j z_j;
  // scalars = (beta1, beta2, eps, step_size, bc2_sqrt, l2, gamma).
  m.def("_noise_adam_native(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, int[] keys, "
        "float[] coeffs, float[] scalars, int stochastic, int[] tensor_ids, int[] offsets, int rounding_key, "
        "int noise) -> ()");
  // The low-rank pass (zo_kernels/lowrank.py) for tensors with ndim >= 2; `undo` empty: no inversion.
  m.def("_lowrank_axpy_native(Tensor(a!)[] params, int[] keys_u, int key_v, float[] alphas, float[] undo, "
        "float gamma, Tensor[] dense, float beta, Tensor(b!)[] planes, int plane_bits, int rank, int stochastic, "
        "int[] tensor_ids, int[] offsets, int rounding_key) -> ()");
  // out float32/bfloat16/float16: z; out int32: the raw Philox words (the integer layer, for tests).
  m.def("_noise_native(Tensor(a!) out, int key, int tensor_id, int offset, int stream, int noise) -> ()");
  m.def("_philox4x32_native(int[] counter, int[] key) -> int[]", &philox4x32);
  // The CPU instruction set the kernel runs with ("avx512", "avx2", "base"); a non-empty argument
  // selects one (tests: every instruction set gives the same bits).
  m.def("_native_cpu_isa(str request=\"\") -> str", &zo::cpu::cpu_isa);
  // Whether this build has the CUDA kernel.
  m.def("_native_has_cuda() -> bool", &has_cuda);
}

extern "C" {
// `import zo_kernels._C` loads the library, whose static initialisers register the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "zo_kernels native ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
