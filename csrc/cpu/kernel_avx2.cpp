// The chunk kernel compiled for x86-64-v3: AVX2, FMA, F16C (Haswell / Zen 1 and later).
// Picked at run time by select_kernels() in token_stats.cpp; see kernel_isa.h.
#include <cmath>
#include <cstdint>

#include "cpu/partial.h"
#include "cpu/token_stats.h"

#if defined(MLLMCAL_HAVE_X86_CLONES)

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define MLLMCAL_ISA_NAME "avx2"
namespace mllmcal {
namespace isa_avx2 {
#include "cpu/kernel_isa.h"
}  // namespace isa_avx2
}  // namespace mllmcal
#pragma GCC pop_options

// Outside the target region: this accessor runs before the CPU check.
const mllmcal::KernelTable& mllmcal::kernels_avx2() { return isa_avx2::kTable; }

#endif  // MLLMCAL_HAVE_X86_CLONES
