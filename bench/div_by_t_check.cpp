// Bit-for-bit check of the AVX-512 kernel's division-free z = x / T (div_by_t in
// csrc/cpu/kernel_isa.h) against the true division, on random (x, T): T over
// [2^-60, 2^60] (the range the kernel uses it for); x over [2^-60, 2^60) in 15 of 16
// vectors (the FMA quotient) and over all bit patterns in the 16th (vectors the kernel
// sends to a true division). Prints the mismatches (expected: 0).
//
//   g++ -O2 -std=c++17 -Icsrc -w bench/div_by_t_check.cpp -o /tmp/div_check && /tmp/div_check
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

#include "kernel_avx512_here.h"

int main() {
  std::mt19937_64 g(1);
  long bad = 0, tested = 0, divided = 0;
  alignas(64) float xs[16], out[16];
  for (int ti = 0; ti < 20000; ++ti) {
    const uint32_t tb = (g() & 0x7fffff) | (static_cast<uint32_t>(127 - 60 + g() % 121) << 23);
    float t;
    std::memcpy(&t, &tb, 4);
    const float fixed[8] = {1.3f, 0.7f, 3.0f, 1.1f, 0.9f, 2.5f, 0.1f, 10.0f};
    if (ti < 8) t = fixed[ti];
    const __m512 vt = _mm512_set1_ps(t), vr = _mm512_set1_ps(1.0f / t);
    for (int k = 0; k < 2000; ++k) {
      for (int j = 0; j < 16; ++j) {
        uint32_t u = static_cast<uint32_t>(g());
        if (k % 16 != 0) u = (u & 0x807fffffu) | (static_cast<uint32_t>(127 - 60 + g() % 120) << 23);
        std::memcpy(&xs[j], &u, 4);
      }
      _mm512_store_ps(out, mllmcal::isa_avx512::div_by_t(_mm512_load_ps(xs), vt, vr));
      bool all_in = true;
      for (int j = 0; j < 16; ++j) {
        const float ax = std::fabs(xs[j]);
        all_in = all_in && ax >= 0x1p-60f && ax <= 0x1p60f;
      }
      for (int j = 0; j < 16; ++j) {
        const float ref = xs[j] / t;
        ++(all_in ? tested : divided);
        if (std::memcmp(&ref, &out[j], 4) != 0 && !(ref != ref && out[j] != out[j])) {
          if (bad < 5) std::printf("x=%a T=%a: %a != %a\n", xs[j], t, out[j], ref);
          ++bad;
        }
      }
    }
  }
  std::printf("FMA quotient: %ld lanes; true division: %ld lanes; mismatches: %ld\n", tested,
              divided, bad);
  return bad != 0;
}
