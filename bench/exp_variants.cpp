// Other ways to compute the AVX-512 exp pass (csrc/cpu/kernel_avx512_passes.h, sums_step4),
// timed against it: is the pass bound by its operation count, and could another exp with
// the same accuracy make it cheaper? Each variant runs the pass's full work per 16
// columns (d = z − m, e = exp(d), s += e, a += e·d, b += e·d²) over 2048 columns in L1,
// best of 4000 runs with rdtsc (TSC cycles, not core cycles), then its e is checked
// against exp in double on 3.2e7 values of d in [−86, 0].
//
//   g++ -O3 -std=c++17 -fno-math-errno -fno-trapping-math -ffp-contract=fast -w \
//       -Icsrc bench/exp_variants.cpp -o /tmp/exp_variants && /tmp/exp_variants
//
// Variants (vector operations per 16 columns, loads folded, in parentheses):
//   kernel     block_sums_avx512 itself, from the kernel's header                     (14)
//   copy       its exp written out here: degree-5 polynomial, vscalefps             (14)
//   intexp     2^n added to the exponent bits (vpslld, vpaddd) instead of vscalefps,
//              with d floored at −86.5 so that every e stays normal                  (16)
//   table32    2^(k/32) from a 32-entry table in two registers (vpermt2ps), a
//              degree-2 polynomial on |r| <= ln2/64, the exponent added as integers  (17)
//   deg4       the kernel's exp with a degree-4 minimax polynomial: one FMA fewer, and
//              20x less exact (2.6e-6 on |r| <= ln2/2, against 1.3e-7)               (13)
//   no_exp     e = d: the sums alone, a lower bound for any exp                       (5)
#include <immintrin.h>
#include <x86intrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>

#include "kernel_avx512_here.h"  // also sets the AVX-512 target for what follows


namespace {

#define C(x) _mm512_set1_ps(x)
const float kP[6] = {0.008297448977828026f, 0.04191680997610092f, 0.1666758507490158f,
                     0.4999888241291046f, 0.9999997019767761f, 1.0000001192092896f};
alignas(64) float kTab[32];

enum Variant { kCopy, kIntExp, kTable32, kDeg4, kNoExp };

template <int V>
inline __m512 exp_of(__m512 d, __m512 tlo, __m512 thi) {
  const __m512 magic = C(12582912.0f);  // 1.5 * 2^23: round to nearest
  if constexpr (V == kNoExp) {
    return d;
  } else if constexpr (V == kTable32) {
    d = _mm512_max_ps(C(-86.5f), d);
    const __m512 t = _mm512_fmadd_ps(d, C(46.16624130844683f), magic);  // 32 / ln2
    const __m512 n = _mm512_sub_ps(t, magic);
    const __m512 r = _mm512_fnmadd_ps(n, C(0.021660849392498290f), d);  // ln2 / 32
    const __m512i ti = _mm512_castps_si512(t);
    const __m512 tab = _mm512_permutex2var_ps(tlo, ti, thi);  // index: the low 5 bits of n
    const __m512 q = _mm512_fmadd_ps(C(0.4999963f), r, C(1.0000147f));
    const __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(tab, r), q, tab);
    const __m512i scale = _mm512_slli_epi32(_mm512_srli_epi32(ti, 5), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(e), scale));
  } else {
    if (V == kIntExp) d = _mm512_max_ps(C(-86.5f), d);
    const __m512 t = _mm512_fmadd_ps(d, C(1.44269504088896341f), magic);
    const __m512 n = _mm512_sub_ps(t, magic);
    const __m512 r = _mm512_fnmadd_ps(n, C(0.693147180559945309f), d);
    __m512 p;
    if constexpr (V == kDeg4) {  // its own minimax fit (relative error 2.6e-6 on |r| <= ln2/2)
      p = _mm512_fmadd_ps(C(0.04145846888422966f), r, C(0.16790886223316193f));
      p = _mm512_fmadd_ps(p, r, C(0.5000435709953308f));
      p = _mm512_fmadd_ps(p, r, C(0.9999634027481079f));
      p = _mm512_fmadd_ps(p, r, C(0.9999992847442627f));
    } else {
      p = _mm512_fmadd_ps(_mm512_fmadd_ps(C(kP[0]), r, C(kP[1])), r, C(kP[2]));
      p = _mm512_fmadd_ps(p, r, C(kP[3]));
      p = _mm512_fmadd_ps(p, r, C(kP[4]));
      p = _mm512_fmadd_ps(p, r, C(kP[5]));
    }
    if (V == kIntExp) {
      const __m512i scale = _mm512_slli_epi32(_mm512_castps_si512(t), 23);
      return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), scale));
    }
    return _mm512_scalef_ps(p, n);
  }
}

template <int V>
__attribute__((noinline)) void pass(const float* z, int len, float m, double* out) {
  const __m512 vm = C(m), tlo = _mm512_load_ps(kTab), thi = _mm512_load_ps(kTab + 16);
  __m512 s = _mm512_setzero_ps(), a = s, b = s;
  for (int j = 0; j + 64 <= len; j += 64) {
    __m512 d[4], e[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) d[k] = _mm512_sub_ps(_mm512_loadu_ps(z + j + 16 * k), vm);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) e[k] = exp_of<V>(d[k], tlo, thi);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m512 ed = _mm512_mul_ps(e[k], d[k]);
      s = _mm512_add_ps(s, e[k]);
      a = _mm512_add_ps(a, ed);
      b = _mm512_fmadd_ps(ed, d[k], b);
    }
  }
  out[0] = _mm512_reduce_add_ps(s);
  out[1] = _mm512_reduce_add_ps(a);
  out[2] = _mm512_reduce_add_ps(b);
}

template <class F>
double best_per_column(F f, int columns) {
  uint64_t best = ~0ull;
  for (int r = 0; r < 4000; ++r) {
    const uint64_t t0 = __rdtsc();
    f();
    const uint64_t t = __rdtsc() - t0;
    best = t < best ? t : best;
  }
  return static_cast<double>(best) / columns;
}

template <int V>
double max_rel_error() {
  const __m512 tlo = _mm512_load_ps(kTab), thi = _mm512_load_ps(kTab + 16);
  std::mt19937 g(1);
  std::uniform_real_distribution<float> ud(-86.0f, 0.0f);
  alignas(64) float dv[16], ev[16];
  double worst = 0.0;
  for (int it = 0; it < 2000000; ++it) {
    for (int l = 0; l < 16; ++l) dv[l] = ud(g);
    _mm512_store_ps(ev, exp_of<V>(_mm512_load_ps(dv), tlo, thi));
    for (int l = 0; l < 16; ++l) {
      const double ref = std::exp(static_cast<double>(dv[l]));
      worst = std::max(worst, std::fabs(ev[l] - ref) / ref);
    }
  }
  return worst;
}

}  // namespace

int main() {
  for (int k = 0; k < 32; ++k) kTab[k] = static_cast<float>(std::exp2(k / 32.0));
  _mm_setcsr(_mm_getcsr() | _MM_FLUSH_ZERO_ON);  // as the kernel runs its unfloored pass
  constexpr int L = 2048;
  alignas(64) static float z[L];
  std::mt19937 g(0);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  float m = -INFINITY;
  for (int i = 0; i < L; ++i) m = std::max(m, z[i] = nd(g));
  double o[3];
  mllmcal::Partial p;
  std::printf("TSC cycles per column (best of 4000 passes over %d columns), three rounds:\n", L);
  std::printf("%8s %8s %8s %8s %8s %8s\n", "kernel", "copy", "intexp", "table32", "deg4", "no_exp");
  for (int round = 0; round < 3; ++round) {
    std::printf("%8.3f %8.3f %8.3f %8.3f %8.3f %8.3f\n",
                best_per_column([&] { mllmcal::isa_avx512::block_sums_avx512<false, false>(z, L, m, &p, nullptr, nullptr); }, L),
                best_per_column([&] { pass<kCopy>(z, L, m, o); }, L),
                best_per_column([&] { pass<kIntExp>(z, L, m, o); }, L),
                best_per_column([&] { pass<kTable32>(z, L, m, o); }, L),
                best_per_column([&] { pass<kDeg4>(z, L, m, o); }, L),
                best_per_column([&] { pass<kNoExp>(z, L, m, o); }, L));
  }
  std::printf("max relative error of e on d in [-86, 0]: copy %.3g | intexp %.3g | table32 %.3g | deg4 %.3g\n",
              max_rel_error<kCopy>(), max_rel_error<kIntExp>(), max_rel_error<kTable32>(),
              max_rel_error<kDeg4>());
  return 0;
}
