// CPU kernel for the baseline of the build (x86-64: SSE2; other architectures: their default). The body is kernel_isa.h.
#include "kernel.h"

namespace zo { namespace cpu { namespace base {
#include "kernel_isa.h"
} } }  // namespace zo::cpu::base
