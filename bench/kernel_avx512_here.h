// The AVX-512 build of the CPU kernel (csrc/cpu/kernel_isa.h) compiled into this
// translation unit, as csrc/cpu/kernel_avx512.cpp does, for the bench programs that call its
// internals directly (div_by_t_check.cpp, kernel_cycles.cpp). Compile with -Icsrc.
#pragma once
#include <immintrin.h>

#include "cpu/partial.h"
#include "cpu/token_stats.h"

#pragma GCC target("arch=x86-64-v4,prefer-vector-width=512")
#define MLLMCAL_KERNEL_AVX512 1
#define MLLMCAL_ISA_NAME "avx512"
namespace mllmcal {
namespace isa_avx512 {
#include "cpu/kernel_isa.h"
}  // namespace isa_avx512
}  // namespace mllmcal
