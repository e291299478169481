// Exact restore (zo_kernels/restore.py): the per-element integer rules, one definition shared by the
// CPU kernel (host C++) and the CUDA kernel (device code).
//
//   s_new  = sum_j alpha_j z_j,  s_undo = sum_j undo_j z_j      fp32, from +0, in key order (sum_noise)
//   theta0 = invert(theta, s_undo [, residue])                  when some undo_j != 0
//   plane  = ordered(theta0) & (2^b - 1), 4 per quad word       when undo is all zero and planes are given
//   theta  = round(gamma theta0 + s_new)                        (forward)
//
// Exactness rests on one thing: the check inside invert() re-applies the forward rounding with the
// bit-identical float operations of the pass that created theta (forward() with gamma = 1: fmul by 1 is
// exact, then one fadd, then one rounding). Both kernels call these functions, the host build has
// -ffp-contract=off and the device build uses __fmul_rn / __fadd_rn (philox.h), so no FMA ever
// changes a sum.
//
// "ordered": a float's bit pattern as an integer with consecutive representable values consecutive
// (sign ? -mag - 1 : mag; -0 is -1, +0 is 0). Everything is branch-free (selects only).
#pragma once

#include <stdint.h>

#include "philox.h"

namespace zo {
namespace restore {

// The same codes as zo::cpu::DType and zo::cuda::DType.
enum Kind : int { F32 = 0, BF16 = 1, F16 = 2 };

constexpr int MAX_PLANE_BITS = 8;

// The grid of one storage type: raw bits <-> float, nearest / stochastic rounding to bits, ordered ints.
template <int K> struct Grid;

template <> struct Grid<F32> {
  using Bits = uint32_t;
  using Ord = int64_t;  // base -/+ 2^b leaves the int32 range near the ends
  static constexpr int W = 32;
  static ZO_HD float to_float(uint32_t b) { return u2f(b); }
  static ZO_HD uint32_t nearest(float f) { return f2u(f); }
  static ZO_HD uint32_t stochastic(float f, uint32_t) { return f2u(f); }  // fp32 ignores stochastic rounding
  static ZO_HD bool finite(uint32_t b) { return (b & 0x7F800000u) != 0x7F800000u; }
  static ZO_HD int64_t ordered(uint32_t b) {
    const int64_t mag = (int64_t)(b & 0x7FFFFFFFu);
    return (b >> 31) ? -mag - 1 : mag;
  }
  static ZO_HD uint32_t from_ordered(int64_t o) {
    return o >= 0 ? (uint32_t)o : ((uint32_t)(-o - 1) | 0x80000000u);
  }
};

template <int K> struct Grid16 {
  using Bits = uint16_t;
  using Ord = int32_t;
  static constexpr int W = 16;
  static ZO_HD float to_float(uint16_t b) { return K == BF16 ? bf16_to_float(b) : fp16_to_float(b); }
  static ZO_HD uint16_t nearest(float f) { return K == BF16 ? float_to_bf16_rne(f) : float_to_fp16_rne(f); }
  static ZO_HD uint16_t stochastic(float f, uint32_t w) {
    return K == BF16 ? float_to_bf16_sr(f, w) : float_to_fp16_sr(f, w);
  }
  static ZO_HD bool finite(uint16_t b) {
    const uint32_t e = K == BF16 ? 0x7F80u : 0x7C00u;
    return ((uint32_t)b & e) != e;
  }
  static ZO_HD int32_t ordered(uint16_t b) {
    const int32_t mag = (int32_t)(b & 0x7FFFu);
    return (b >> 15) ? -mag - 1 : mag;
  }
  static ZO_HD uint16_t from_ordered(int32_t o) {
    return (uint16_t)(o >= 0 ? (uint32_t)o : ((uint32_t)(-o - 1) | 0x8000u));
  }
};
template <> struct Grid<BF16> : Grid16<BF16> {};
template <> struct Grid<F16> : Grid16<F16> {};

// ----------------------------------------------------------------------------- the float side
// One term of a noise sum: s + c z (the sums start at +0.0f and take the keys in order).
ZO_HD float sum_step(float s, float c, float z) { return fadd(s, fmul(c, z)); }

// The unrounded forward value gamma theta0 + s (rounded by Grid<K>::nearest / stochastic).
ZO_HD float forward(float theta0, float gamma, float s) { return fadd(fmul(theta0, gamma), s); }

// ----------------------------------------------------------------------------- the inverse
// One candidate of restore.invert: if it lies on the grid and the forward rounding maps it back to y,
// and it is nearer the estimate than the best so far (strictly: earlier candidates win ties), take it.
template <int K>
ZO_HD void try_candidate(typename Grid<K>::Ord cand, typename Grid<K>::Ord est, typename Grid<K>::Ord y_ord, float s,
                         typename Grid<K>::Ord& best, typename Grid<K>::Ord& best_dist) {
  using G = Grid<K>;
  using O = typename G::Ord;
  constexpr O LIM = (O)1 << (G::W - 1);
  const bool inside = cand >= -LIM && cand < LIM;
  const O cc = cand < -LIM ? -LIM : (cand > LIM - 1 ? LIM - 1 : cand);
  const O fwd = G::ordered(G::nearest(forward(G::to_float(G::from_ordered(cc)), 1.0f, s)));
  const bool ok = inside && fwd == y_ord;
  const O d = cand - est;
  const O dist = d < 0 ? -d : d;
  const bool better = ok && dist < best_dist;
  best = better ? cc : best;
  best_dist = better ? dist : best_dist;
}

// theta0 (bits) with round(theta0 + s) == y: among the candidates that the forward rounding maps back to
// y, the one nearest est = ordered(round(y - s)) (earlier candidates win ties); est itself when none
// does; y when y is not finite. The candidates are base, base + step, base - step with
// base = est - ((est - res) & mask):
//   without a plane   mask = 0, step = -1:                  est, est - 1, est + 1
//   with b bits       mask = 2^b - 1, step = 2^b, res the element's stored residue
// (invert_params gives mask and step; kernels pass them as run-time values, which also keeps the
// compiler from specialising the distances into a form it cannot vectorise).
template <int K>
ZO_HD typename Grid<K>::Bits invert(typename Grid<K>::Bits y, float s, uint32_t res, int32_t mask, int32_t step) {
  using G = Grid<K>;
  using O = typename G::Ord;
  const O y_ord = G::ordered(y);
  const O est = G::ordered(G::nearest(fsub(G::to_float(y), s)));
  O best = est;
  O best_dist = (O)1 << (G::W - 2);  // larger than any candidate's distance (at most 2^(bits+1))
  const O base = est - ((est - (O)res) & (O)mask);
  try_candidate<K>(base, est, y_ord, s, best, best_dist);
  try_candidate<K>(base + (O)step, est, y_ord, s, best, best_dist);
  try_candidate<K>(base - (O)step, est, y_ord, s, best, best_dist);
  return G::finite(y) ? G::from_ordered(best) : y;
}

// The first candidate alone (the fast path): returns what invert() returns whenever `settled` comes back
// true, i.e. when base maps back to y at a distance d from est with 2 d <= |step| (no other candidate can
// be nearer; a tie goes to base, the first), or when y is not finite. Nearly every element settles
// here (est itself is a preimage; the plane's base is est or a neighbour); the rest call invert().
template <int K>
ZO_HD typename Grid<K>::Bits invert_first(typename Grid<K>::Bits y, float s, uint32_t res, int32_t mask,
                                          int32_t step, bool& settled) {
  using G = Grid<K>;
  using O = typename G::Ord;
  const O y_ord = G::ordered(y);
  const O est = G::ordered(G::nearest(fsub(G::to_float(y), s)));
  O best = est;
  O best_dist = (O)1 << (G::W - 2);
  const O base = est - ((est - (O)res) & (O)mask);
  try_candidate<K>(base, est, y_ord, s, best, best_dist);
  const O astep = step < 0 ? -(O)step : (O)step;
  const bool finite = G::finite(y);
  settled = (2 * best_dist <= astep) | !finite;
  return finite ? G::from_ordered(best) : y;
}

// mask and step of invert(): plane_bits 0 for no plane, else 2, 4 or 8.
ZO_HD void invert_params(int plane_bits, int32_t& mask, int32_t& step) {
  mask = plane_bits ? (1 << plane_bits) - 1 : 0;
  step = plane_bits ? 1 << plane_bits : -1;
}

// ----------------------------------------------------------------------------- residue planes
// The residue of a value: the low `bits` bits of its grid position.
template <int K>
ZO_HD uint32_t residue(typename Grid<K>::Bits x, int bits) {
  return (uint32_t)Grid<K>::ordered(x) & ((1u << bits) - 1u);
}

// A plane holds one word of 4 * bits bits per quad (element 4q + c in bits [c bits, (c + 1) bits)),
// stored little-endian in bits / 2 bytes; word w of a tensor's plane is its global quad offset / 4 + w.
ZO_HD uint32_t pack4(uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3, int bits) {
  return r0 | (r1 << bits) | (r2 << (2 * bits)) | (r3 << (3 * bits));
}

ZO_HD uint32_t unpack(uint32_t word, int lane, int bits) { return (word >> (lane * bits)) & ((1u << bits) - 1u); }

ZO_HD uint32_t load_word(const uint8_t* plane, int64_t w, int bits) {
  const int nb = bits / 2;
  const uint8_t* b = plane + w * nb;
  uint32_t word = b[0];
  if (nb >= 2) word |= (uint32_t)b[1] << 8;
  if (nb >= 4) word |= ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
  return word;
}

ZO_HD void store_word(uint8_t* plane, int64_t w, int bits, uint32_t word) {
  const int nb = bits / 2;
  uint8_t* b = plane + w * nb;
  b[0] = (uint8_t)word;
  if (nb >= 2) b[1] = (uint8_t)(word >> 8);
  if (nb >= 4) {
    b[2] = (uint8_t)(word >> 16);
    b[3] = (uint8_t)(word >> 24);
  }
}

}  // namespace restore
}  // namespace zo
