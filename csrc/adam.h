// The fused ZO-Adam pass, per element: the one C++ definition for the CPU kernel (host) and the CUDA
// kernel (device). zo_kernels/adam.py states the algorithm and holds the PyTorch reference.
//
//   g = sum_j c_j z_j + l2 theta;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   theta <- gamma theta - s m / (sqrt(v) / sqrt(b2c) + eps)
//
// Every operation is one IEEE add, multiply, divide or sqrt in this order (no FMA), like philox.h, so
// host and device compute the same bits from the same z.
#pragma once

#include "philox.h"

namespace zo {

ZO_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The scalars of one call, each rounded once from the host's double (zo_kernels.adam.AdamScalars).
struct AdamCoef {
  float b1, omb1;     // beta1, 1 - beta1
  float b2, omb2;     // beta2, 1 - beta2
  float eps;
  float step_size;    // lr / (1 - beta1^k)
  float bc2_sqrt;     // sqrt(1 - beta2^k)
  float l2;           // coupled weight decay (added to g)
  float gamma;        // decoupled weight decay factor
};

// One element: g is sum_j c_j z_j (accumulated from +0 in key order); m and v are updated in place;
// returns theta in fp32 (the caller rounds it to theta's dtype).
ZO_HD float adam_element(float theta, float g, float& m, float& v, const AdamCoef& c) {
  g = fadd(g, fmul(c.l2, theta));
  m = fadd(fmul(c.b1, m), fmul(c.omb1, g));
  v = fadd(fmul(c.b2, v), fmul(c.omb2, fmul(g, g)));
  const float denom = fadd(fdiv(fsqrt(v), c.bc2_sqrt), c.eps);
  return fsub(fmul(c.gamma, theta), fmul(c.step_size, fdiv(m, denom)));
}

}  // namespace zo
