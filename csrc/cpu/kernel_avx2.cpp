// CPU kernel for AVX2 (x86-64-v3 class), chosen at run time. The bodies are kernel_isa.h, lowrank_isa.h and adam_isa.h.
// kernel_avx512.cpp is the same wrapper for AVX-512: each instruction set needs its own translation unit, target pragma
// and namespace, so the two files differ only there (a pair `duplicates` lists on purpose).
#include "kernel.h"
#include "lowrank_kernel.h"
#include "adam_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define ZO_ISA_ENABLED 1
#define ZO_ISA_AVX2 1  // GCC does not define __AVX2__ etc. for a pragma target
#endif

namespace zo { namespace cpu { namespace avx2 {
#if defined(ZO_ISA_ENABLED)
#include "kernel_isa.h"
#include "lowrank_isa.h"
#include "adam_isa.h"
#else
void run(const Args& a, int64_t b0, int64_t b1) { base::run(a, b0, b1); }  // never selected here
void lowrank_normals(const NormalsJob& j, int64_t b0, int64_t b1) { base::lowrank_normals(j, b0, b1); }
void lowrank_run(const LowrankPass& a, const LowrankTask& t, int64_t b0, int64_t b1) { base::lowrank_run(a, t, b0, b1); }
void adam_run(const AdamPass& a, const AdamTask& t, int64_t b0, int64_t b1) { base::adam_run(a, t, b0, b1); }
#endif
} } }  // namespace zo::cpu::avx2

#if defined(ZO_ISA_ENABLED)
#pragma GCC pop_options
#endif
