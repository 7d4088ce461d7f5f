// The chunk kernel compiled for x86-64-v4: AVX-512 F/BW/CD/DQ/VL with 512-bit vectors (Skylake-X / Zen 4 and later).
// Picked at run time by select_kernels() in token_stats.cpp; see kernel_isa.h.
#include <cmath>
#include <cstdint>

// GCC 12's own avx512fintrin.h trips -W(maybe-)uninitialized on its _mm512_undefined_*.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "cpu/partial.h"
#include "cpu/token_stats.h"

#if defined(MLLMCAL_HAVE_X86_CLONES)

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,prefer-vector-width=512")
#define MLLMCAL_ISA_NAME "avx512"
#define MLLMCAL_KERNEL_AVX512 1  // kernel_isa.h: the intrinsics block_sums
namespace mllmcal {
namespace isa_avx512 {
#include "cpu/kernel_isa.h"
}  // namespace isa_avx512
}  // namespace mllmcal
#pragma GCC pop_options
#pragma GCC diagnostic pop

// Outside the target region: this accessor runs before the CPU check.
const mllmcal::KernelTable& mllmcal::kernels_avx512() { return isa_avx512::kTable; }

#endif  // MLLMCAL_HAVE_X86_CLONES
