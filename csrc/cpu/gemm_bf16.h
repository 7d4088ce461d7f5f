// C = A B^T (+ bias) for bf16 A [M, K] and B [N, K] (rows contiguous along K) into fp32 C
// [M, N], with AVX512-BF16's vdpbf16ps: each product of two bf16 values is exact in fp32
// and the sums are fp32, so C is what an fp32 GEMM of the widened inputs gives, up to the
// order of the fp32 additions (no GEMM fixes that order). What linear_token_stats needs for
// bf16 inputs: logits kept in fp32 at the speed of a bf16 GEMM (torch's CPU build has no
// bf16 GEMM with an fp32 output). As the instruction does, bf16 subnormal inputs count as
// zero and subnormal partial sums flush to zero (|values| below 1.2e-38).
#pragma once

#include <cstdint>

namespace mllmcal {

// Whether this CPU runs gemm_bf16_nt (AVX512-BF16).
bool gemm_bf16_supported();

// lda, ldb, ldc in elements (>= K, K, N). bias: fp32 [N] or nullptr. num_threads <= 0:
// OpenMP's default. Call only where gemm_bf16_supported().
void gemm_bf16_nt(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c,
                  int64_t ldc, int64_t m, int64_t n, int64_t k, const float* bias,
                  int num_threads);

}  // namespace mllmcal
