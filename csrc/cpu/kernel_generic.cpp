// The chunk kernel compiled for baseline x86-64 (SSE2) or whatever the compiler's default target is.
// Picked at run time by select_kernels() in token_stats.cpp; see kernel_isa.h.
#include <cmath>
#include <cstdint>

#include "cpu/partial.h"
#include "cpu/token_stats.h"

#define MLLMCAL_ISA_NAME "generic"
namespace mllmcal {
namespace isa_generic {
#include "cpu/kernel_isa.h"
}  // namespace isa_generic
}  // namespace mllmcal

// Outside the target region: this accessor runs before the CPU check.
const mllmcal::KernelTable& mllmcal::kernels_generic() { return isa_generic::kTable; }
