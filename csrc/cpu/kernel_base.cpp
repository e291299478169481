// CPU kernel for the baseline of the build (x86-64: SSE2; other architectures: their default). The bodies are kernel_isa.h, lowrank_isa.h and adam_isa.h.
#include "kernel.h"
#include "lowrank_kernel.h"
#include "adam_kernel.h"

namespace zo { namespace cpu { namespace base {
#include "kernel_isa.h"
#include "lowrank_isa.h"
#include "adam_isa.h"
} } }  // namespace zo::cpu::base
