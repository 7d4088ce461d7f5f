// Cycles per column of the AVX-512 CPU kernel's block loops, without perf counters (the
// KVM guest this was written on has none, and valgrind has no AVX-512): each function is
// timed with rdtsc on data in L1/L2, best of 2000 runs so that other processes' load
// drops out; then a [64, 131072] matrix per dtype (beyond L2) against a read of the same
// bytes, best of 40. TSC cycles, not core cycles (the TSC here ticks at 2.3 GHz).
//
//   g++ -O3 -std=c++17 -fno-math-errno -fno-trapping-math -ffp-contract=fast -fopenmp \
//       -Icsrc -w bench/kernel_cycles.cpp -o /tmp/kernel_cycles && /tmp/kernel_cycles
//
// Point -I at another checkout's csrc to time its kernel: the chunk calls exist there;
// the exp-pass lines name this checkout's block_sums_avx512 (older ones had
// block_sums(z, len, m, &partial)).
#include <immintrin.h>
#include <x86intrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>

#include "kernel_avx512_here.h"

using namespace mllmcal::isa_avx512;

template <class F>
static double best_per_column(F f, int columns) {
  uint64_t best = ~0ull;
  for (int r = 0; r < 2000; ++r) {
    const uint64_t t0 = __rdtsc();
    f();
    const uint64_t t = __rdtsc() - t0;
    if (t < best) best = t;
  }
  return static_cast<double>(best) / columns;
}

int main() {
  constexpr int V = 131072;
  static float x[V] __attribute__((aligned(64)));
  static uint16_t xb[V] __attribute__((aligned(64)));
  std::mt19937 g(0);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int i = 0; i < V; ++i) {
    x[i] = nd(g);
    uint32_t u;
    __builtin_memcpy(&u, &x[i], 4);
    xb[i] = static_cast<uint16_t>(u >> 16);
  }
  mllmcal::Partial p;
  const auto& fp32 = kTable.chunk[mllmcal::kF32];
  const auto& bf16 = kTable.chunk[mllmcal::kBF16];
  const double sums = best_per_column([&] { block_sums_avx512<true, true>(x, 2048, 9.0f, &p, nullptr, nullptr); }, 2048);
  const double sums_nf = best_per_column([&] {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | _MM_FLUSH_ZERO_ON);
    block_sums_avx512<false, true>(x, 2048, 9.0f, &p, nullptr, nullptr);
    _mm_setcsr(csr);
  }, 2048);
  const double one = best_per_column([&] { fp32(x, 0, 2048, 1.0f, false, 5, nullptr, &p); }, 2048);
  const double row = best_per_column([&] { fp32(x, 0, V, 1.0f, false, 5, nullptr, &p); }, V);
  const double row_t = best_per_column([&] { fp32(x, 0, V, 1.3f, true, 5, nullptr, &p); }, V);
  const double row_b = best_per_column([&] { bf16(xb, 0, V, 1.0f, false, 5, nullptr, &p); }, V);
  const double row_b_nl = best_per_column([&] { bf16(xb, 0, V, 1.0f, false, -1, nullptr, &p); }, V);
  std::printf("TSC cycles per column: block_sums %.3f (unfloored %.3f) | chunk fp32: one block %.3f, "
              "row of %d %.3f, T=1.3 %.3f | chunk bf16 row %.3f (no label %.3f)\n",
              sums, sums_nf, one, V, row, row_t, row_b, row_b_nl);

  // A [64, 131072] matrix per dtype (32 MiB fp32, 16 MiB bf16: beyond L2, as in the
  // bench), one thread, against one read of the same bytes (an int32 max, the bench's
  // floor): the single-thread kernel/floor ratio.
  constexpr int N = 64;
  static float mx[N * V] __attribute__((aligned(64)));
  static uint16_t mb[N * V] __attribute__((aligned(64)));
  for (int i = 0; i < N * V; ++i) {
    mx[i] = x[i % V] + static_cast<float>(i / V) * 0.01f;
    uint32_t u;
    __builtin_memcpy(&u, &mx[i], 4);
    mb[i] = static_cast<uint16_t>(u >> 16);
  }
  auto floor_read = [](const void* p, size_t bytes) {
    const __m512i* q = static_cast<const __m512i*>(p);
    __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
    for (size_t k = 0; k + 4 <= bytes / 64; k += 4) {
      m0 = _mm512_max_epi32(m0, _mm512_load_si512(q + k));
      m1 = _mm512_max_epi32(m1, _mm512_load_si512(q + k + 1));
      m2 = _mm512_max_epi32(m2, _mm512_load_si512(q + k + 2));
      m3 = _mm512_max_epi32(m3, _mm512_load_si512(q + k + 3));
    }
    volatile int sink = _mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_max_epi32(m0, m1), _mm512_max_epi32(m2, m3)));
    (void)sink;
  };
  auto best_matrix = [&](auto f) {
    uint64_t best = ~0ull;
    for (int r = 0; r < 40; ++r) {
      const uint64_t t0 = __rdtsc();
      f();
      const uint64_t t = __rdtsc() - t0;
      if (t < best) best = t;
    }
    return static_cast<double>(best) / (static_cast<double>(N) * V);
  };
  const double m32 = best_matrix([&] { for (int i = 0; i < N; ++i) fp32(mx + static_cast<size_t>(i) * V, 0, V, 1.0f, false, 5, nullptr, &p); });
  const double f32 = best_matrix([&] { floor_read(mx, sizeof(mx)); });
  const double m16 = best_matrix([&] { for (int i = 0; i < N; ++i) bf16(mb + static_cast<size_t>(i) * V, 0, V, 1.0f, false, 5, nullptr, &p); });
  const double f16 = best_matrix([&] { floor_read(mb, sizeof(mb)); });
  std::printf("[%d, %d], one thread, TSC cycles per column: fp32 %.3f (floor %.3f, ratio %.2f) | "
              "bf16 %.3f (floor %.3f, ratio %.2f)\n", N, V, m32, f32, m32 / f32, m16, f16, m16 / f16);
  return 0;
}
