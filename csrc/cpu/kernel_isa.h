// The ISA-specific chunk kernel. NO include guard on purpose: each kernel_<isa>.cpp
// includes the standard headers, then sets `#pragma GCC target(...)`, then includes this
// file inside its own namespace, so the same source is compiled once per instruction set
// and picked at run time (the wheel must run on any x86-64, so no -march=native).
//
// Everything here has internal linkage and calls nothing with external linkage in its hot
// loops, so no out-of-line function compiled for a wide ISA can leak to other code.
//
// The generic and AVX2 loops are written for GCC's auto-vectoriser: branch-free bodies,
// selects instead of ifs, bit casts through __builtin_memcpy, and `#pragma omp simd
// reduction` where a loop reduces (without -ffast-math GCC may not reassociate fp sums by
// itself; the pragma allows it for exactly these loops, while NaN/inf semantics stay IEEE
// everywhere else). The AVX-512 build (MLLMCAL_KERNEL_AVX512) replaces the two block
// passes and the argmax search with intrinsics, where GCC's vectorisation left most of
// the time on the table: one dependency chain per reduction, selects around the exp
// (profile in bench/NOTES.md).

namespace {

// Columns per block. A block is read once from memory (into `zbuf`, 8 KiB, when it must be
// converted or divided by T; fp32 as is is re-read in place) and then re-read from L1 for
// the exp pass: "block max first, then exp of the block".
constexpr int kBlock = 2048;

static inline uint32_t f2u(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}
static inline float u2f(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Below this, exp(x) is taken as exactly 0 (see exp_core).
constexpr float kExpCutoff = -86.5f;

// exp(x) for kExpCutoff <= x <= 0, accurate to ~1 ulp in fp32. Callers select 0 for
// x < kExpCutoff (including x = −inf, for which this returns garbage).
//
// Cephes-style: x = n·ln2 + r with n = round(x/ln2), |r| <= ln2/2, then
// exp(r) ≈ 1 + r + r²·P(r) (degree-5 minimax P), and the 2^n scaling is an integer add
// to the exponent field. Rounding to n uses the 1.5·2^23 trick: adding it to a float of
// magnitude < 2^22 leaves round-to-nearest(x/ln2) in the low mantissa bits, so n comes
// out of the bits of `t` with integer ops only (no float->int conversion, which is
// undefined on the garbage a −inf argument produces before the final select).
// ln2 is split as C1 + C2 (C1 has few bits, so n·C1 is exact) for the reduction.
// The cut-off −86.5 keeps n >= −125, so p·2^n is always a normal float (p >= 1/√2);
// terms below e^−86.5 ≈ 2.7e-38 of the block maximum are far below fp32 resolution of
// sums that contain the maximum's term 1, so dropping them changes nothing.
static inline float exp_core(float x) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t k = f2u(t) - f2u(kMagic);  // n as a two's-complement integer
  return u2f(f2u(p) + (k << 23));
}

// fp16 -> fp32, exact, branch-free: normal numbers rebias the exponent; inf/NaN keep
// their payload under an all-ones exponent; subnormals are em · 2^-24 (exact in fp32).
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const uint32_t infnan = (em << 13) | 0x7f800000u;
  const uint32_t sub = f2u(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f);
  const uint32_t mag = em >= 0x7c00u ? infnan : (em >= 0x0400u ? normal : sub);
  return u2f(mag | sign);
}

// fp32 -> fp16, round to nearest even (what torch's .to(torch.float16) does).
// Normal range: add the rebias plus 0xfff (+1 when the kept mantissa is odd) and shift:
// a carry out of the mantissa rolls correctly into the exponent, up to inf. Values below
// 2^-14 become fp16 subnormals by one fp32 addition of 0.5: the FPU's own RNE aligns
// the mantissa so that the low bits are the fp16 subnormal.
static inline uint16_t float_to_half(float x) {
  const uint32_t u = f2u(x);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t f = u ^ sign;
  const uint32_t infnan = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t sub = f2u(u2f(f) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;  // 0xc8000000 = (15−127)<<23
  const uint32_t mag = f >= 0x47800000u ? infnan : (f < 0x38800000u ? sub : normal);
  return static_cast<uint16_t>(mag | (sign >> 16));
}

static inline float bf16_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
static inline uint16_t float_to_bf16(float x) {
  const uint32_t u = f2u(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

template <int DT>
struct Io;
template <>
struct Io<kF32> {
  using T = float;
  static inline float load(float v) { return v; }
  static inline float store(float z) { return z; }
};
template <>
struct Io<kF16> {
  using T = uint16_t;
  static inline float load(uint16_t v) { return half_to_float(v); }
  static inline uint16_t store(float z) { return float_to_half(z); }
};
template <>
struct Io<kBF16> {
  using T = uint16_t;
  static inline float load(uint16_t v) { return bf16_to_float(v); }
  static inline uint16_t store(float z) { return float_to_bf16(z); }
};

// Pass 1 over a block: the block max (NaN ignored here), whether any z may be NaN and,
// when kStore, z = x / T into zbuf (read in x's dtype, converted in registers). Out of
// line, like the other block loops, so the vectoriser sees each loop alone (see
// block_sums).
//
// NaN check: a plain sum of the z (one add per vector, where a compare-and-or per element
// cost three) is NaN or infinite whenever a z is NaN; only then (or with an inf, or an
// overflowing sum: false alarms cost time, never results) is the block rescanned exactly.
template <int DT, bool kDivide, bool kStore>
__attribute__((noinline)) static float load_block(const typename Io<DT>::T* __restrict xb,
                                                  int len, float temperature,
                                                  float* __restrict zbuf, int* any_nan) {
  float mb = -INFINITY;
  float sum = 0.0f;
#pragma omp simd reduction(max : mb) reduction(+ : sum)
  for (int j = 0; j < len; ++j) {
    float z = Io<DT>::load(xb[j]);
    if (kDivide) z = z / temperature;  // a true division: z must equal the oracle's x / T bit for bit
    if (kStore) zbuf[j] = z;
    mb = mb > z ? mb : z;
    sum += z;
  }
  int nan = 0;
  if (!(sum - sum == 0.0f)) {
    for (int j = 0; j < len; ++j) {
      float z = Io<DT>::load(xb[j]);
      if (kDivide) z = z / temperature;
      nan |= (z != z);
    }
  }
  *any_nan = nan;
  return mb;
}

#if defined(MLLMCAL_KERNEL_AVX512)
// AVX-512 pass 1: the same contract as the generic loop above, with four independent max
// and sum chains. GCC's `omp simd` reduction keeps one chain each, whose 4-cycle latency
// per 16 columns made pass 1 a third of the kernel's time. Widening in registers: bf16
// is a 16-bit shift of the zero-extended halves; fp16 is vcvtph2ps (exact, subnormals
// included).
template <int DT>
static inline __m512 load16(const typename Io<DT>::T* p) {
  if constexpr (DT == kF32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (DT == kBF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

template <int DT>
static inline __m512 load16_masked(const typename Io<DT>::T* p, __mmask16 m) {
  if constexpr (DT == kF32) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (DT == kBF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}

// z = x / T, correctly rounded, without vdivps (5 cycles per 16 columns on one port, 40%
// of the kernel's time with a temperature): with r = RN(1/T), q0 = RN(x·r), the exact
// remainder e = x − q0·T (one FMA) and q1 = RN(q0 + e·r), q1 is the correctly rounded
// x / T (Markstein's theorem: r within half an ulp of 1/T and q0 within one ulp of x/T;
// Muller et al., Handbook of Floating-Point Arithmetic, 2nd ed., sec. 4.9), provided
// nothing over- or underflows: the caller takes this path only for 2^-60 <= T <= 2^60,
// and a vector with a lane outside 2^-60 <= |x| <= 2^60 (a zero, NaN, inf, a hostile
// magnitude) takes a true division, so q0 stays within 2^±120 and e is exact. Checked
// bit for bit against the division on 6e8 random (x, T) lanes, 0 mismatches
// (bench/div_by_t_check.cpp).
static inline __m512 div_by_t(__m512 x, __m512 vt, __m512 vr) {
  const __m512 q0 = _mm512_mul_ps(x, vr);
  const __m512 q1 = _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, vt, x), vr, q0);
  const __m512 ax = _mm512_abs_ps(x);
  const __mmask16 ok = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0x1p-60f), _CMP_GE_OQ) &
                       _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0x1p60f), _CMP_LE_OQ);
  return ok == 0xffff ? q1 : _mm512_div_ps(x, vt);
}

// Two vectors of 16 columns from 32 consecutive ones. bf16: one 64-byte load and two
// word permutes (vpermw, zeros in the low halves), one shuffle per 16 columns where
// vpmovzxwd + vpslld cost two; the column order is kept, so zbuf stays in column order.
template <int DT>
static inline void load32(const typename Io<DT>::T* p, __m512& lo, __m512& hi) {
  if constexpr (DT == kBF16) {
    const __m512i w = _mm512_loadu_si512(p);
    const __m512i ilo = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0,
                                         7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
    const __m512i ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
    constexpr __mmask32 kOdd = 0xaaaaaaaau;  // the high word of each 32-bit lane
    lo = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(kOdd, ilo, w));
    hi = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(kOdd, ihi, w));
  } else {
    lo = load16<DT>(p);
    hi = load16<DT>(p + 16);
  }
}

// Pass 1 of the AVX-512 build: the block max with NaN ignored (vmaxps returns its second
// operand when either is NaN, and the running max is that operand), z = x / T into zbuf
// when kStore. Unlike load_block it does not look for NaN: the exp pass does, for free
// (block_sums propagates a NaN z into the sum of e; the caller checks it), which saves
// one vector operation per 16 columns here. *any_nan is always 0.
template <int DT, bool kDivide, bool kStore>
__attribute__((noinline)) static float load_block_avx512(const typename Io<DT>::T* __restrict xb,
                                                         int len, float temperature,
                                                         float* __restrict zbuf, int* any_nan) {
  const __m512 vt = _mm512_set1_ps(temperature);
  // 1/T once per block (a scalar division); the FMA quotient only for a moderate T.
  const bool fast = temperature >= 0x1p-60f && temperature <= 0x1p60f;
  const __m512 vr = _mm512_set1_ps(1.0f / temperature);
  // Four max chains: one chain's 4-cycle latency per 16 columns made pass 1 a third of
  // the old kernel's time.
  __m512 mx[4];
  for (int k = 0; k < 4; ++k) mx[k] = _mm512_set1_ps(-INFINITY);
  int j = 0;
  for (; j + 64 <= len; j += 64) {
    __m512 z[4];
    load32<DT>(xb + j, z[0], z[1]);
    load32<DT>(xb + j + 32, z[2], z[3]);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      if (kDivide) z[k] = fast ? div_by_t(z[k], vt, vr) : _mm512_div_ps(z[k], vt);
      if (kStore) _mm512_store_ps(zbuf + j + 16 * k, z[k]);
      mx[k] = _mm512_max_ps(z[k], mx[k]);
    }
  }
  for (; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? static_cast<__mmask16>(0xffff)
                                      : static_cast<__mmask16>((1u << (len - j)) - 1u);
    __m512 z = load16_masked<DT>(xb + j, m);
    if (kDivide) z = _mm512_div_ps(z, vt);
    if (kStore) _mm512_mask_storeu_ps(zbuf + j, m, z);
    mx[0] = _mm512_mask_max_ps(mx[0], m, z, mx[0]);
  }
  *any_nan = 0;
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3])));
}
#define MLLMCAL_LOAD_BLOCK load_block_avx512
#else
#define MLLMCAL_LOAD_BLOCK load_block
#endif

// The scaled copy: zbuf rounded to the output dtype.
template <int DT>
__attribute__((noinline)) static void store_block(const float* __restrict zbuf, int len,
                                                  typename Io<DT>::T* __restrict ob) {
#pragma omp simd
  for (int j = 0; j < len; ++j) ob[j] = Io<DT>::store(zbuf[j]);
}

// e = exp(z − m) over one block and the sums s, a, b, q relative to m (any m >= the block max).
#if defined(MLLMCAL_KERNEL_AVX512)
// AVX-512 (where this loop is most of the kernel's time): d = max(z − mb, kDFloor), then
// e = 2^n · e^r with n = round(d / ln2), r = d − n·ln2, e^r a
// degree-5 minimax polynomial (relative error 1.3e-7 on |r| <= ln2/2, fitted in fp32
// coefficients) and the 2^n scaling by vscalefps. The floor replaces exp_core's select:
// a term with d < kDFloor (−inf included) adds e = e^kDFloor ≈ 1.6e-38 and e·d, e·d²
// below 2e-34, i.e. nothing next to the maximum's term 1 (a sum of 2^31 of them is still
// 1e-24), and every value stays a normal float. 16 vector operations per 16 columns,
// against 30 with exp_core and the selects.
//
// One-step reduction r = d − n·ln2 by a single FMA (the product is exact inside it): the
// only error is fp32 ln2's, 1.9e-9·|n|, i.e. 3e-8 relative on the terms that matter
// (|n| <= 15 down to e^-10 of the max) and 2.4e-7 on e^-87 ones.
constexpr float kDFloor = -87.0f;
constexpr float kLn2 = 0.693147180559945309f;

struct Sums512 {
  __m512 s, a, b, q;
};

// d = z − m, floored at kDFloor when kClamp (NaN stays NaN: vmaxps returns its second
// operand when either is NaN).
template <bool kClamp>
static inline __m512 diff(__m512 z, __m512 vmb) {
  const __m512 d = _mm512_sub_ps(z, vmb);
  return kClamp ? _mm512_max_ps(_mm512_set1_ps(kDFloor), d) : d;
}

template <bool kClamp>
static inline void sums_step(Sums512& acc, __m512 z, __m512 vmb) {
  const __m512 d = diff<kClamp>(z, vmb);
  const __m512 magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: round to nearest
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(d, _mm512_set1_ps(1.44269504088896341f), magic), magic);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), d);
  __m512 p = _mm512_set1_ps(0.008297448977828026f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04191680997610092f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.1666758507490158f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.4999888241291046f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.9999997019767761f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000001192092896f));
  const __m512 e = _mm512_scalef_ps(p, n);
  const __m512 ed = _mm512_mul_ps(e, d);
  acc.s = _mm512_add_ps(acc.s, e);
  acc.a = _mm512_add_ps(acc.a, ed);
  acc.b = _mm512_fmadd_ps(ed, d, acc.b);
  acc.q = _mm512_fmadd_ps(e, e, acc.q);
}

// sums_step on four vectors, written operation by operation across the four so that
// independent work is adjacent in the instruction stream.
template <bool kClamp>
static inline void sums_step4(Sums512& acc, const float* z, __m512 vmb) {
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  __m512 d[4], n[4], r[4], p[4], e[4], ed[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) d[k] = diff<kClamp>(_mm512_loadu_ps(z + 16 * k), vmb);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)
    n[k] = _mm512_sub_ps(_mm512_fmadd_ps(d[k], _mm512_set1_ps(1.44269504088896341f), magic), magic);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) r[k] = _mm512_fnmadd_ps(n[k], _mm512_set1_ps(kLn2), d[k]);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)
    p[k] = _mm512_fmadd_ps(_mm512_set1_ps(0.008297448977828026f), r[k], _mm512_set1_ps(0.04191680997610092f));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) p[k] = _mm512_fmadd_ps(p[k], r[k], _mm512_set1_ps(0.1666758507490158f));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) p[k] = _mm512_fmadd_ps(p[k], r[k], _mm512_set1_ps(0.4999888241291046f));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) p[k] = _mm512_fmadd_ps(p[k], r[k], _mm512_set1_ps(0.9999997019767761f));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) p[k] = _mm512_fmadd_ps(p[k], r[k], _mm512_set1_ps(1.0000001192092896f));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) e[k] = _mm512_scalef_ps(p[k], n[k]);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) ed[k] = _mm512_mul_ps(e[k], d[k]);
  // One accumulator set, four adds into each per trip: 16 cycles of add latency per
  // 32-cycle trip, and eight zmm registers fewer than two sets (which spilled).
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    acc.s = _mm512_add_ps(acc.s, e[k]);
    acc.a = _mm512_add_ps(acc.a, ed[k]);
    acc.b = _mm512_fmadd_ps(ed[k], d[k], acc.b);
    acc.q = _mm512_fmadd_ps(e[k], e[k], acc.q);
  }
}

// Lane sums in double (the Partial's precision).
static inline double reduce_pd(__m512 v) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

// `pf`..`pf_end`: the bytes of the next block, prefetched into L1 while this block's exp
// pass runs from L1 (the pass reads no new lines, so the hardware prefetcher would
// otherwise sit idle, and pass 1 of the next block would wait on memory).
template <bool kClamp>
__attribute__((noinline)) static void block_sums_avx512(const float* __restrict zbuf, int len, float mb,
                                                        Partial* __restrict out, const char* pf,
                                                        const char* pf_end) {
  const __m512 vmb = _mm512_set1_ps(mb);
  Sums512 x{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int j = 0;
  // Four vectors per trip: each vector's exp is a chain of ~15 dependent 4-cycle
  // operations, so the core needs several chains side by side in program order to issue
  // two per cycle (two were not enough: 0.8 cycles per column instead of 0.6).
  for (; j + 64 <= len; j += 64) {
    // Four lines per 64 columns: a whole fp32 block (8 KiB) over one exp pass.
    if (pf < pf_end) {
      _mm_prefetch(pf, _MM_HINT_T0);
      _mm_prefetch(pf + 64, _MM_HINT_T0);
      _mm_prefetch(pf + 128, _MM_HINT_T0);
      _mm_prefetch(pf + 192, _MM_HINT_T0);
      pf += 256;
    }
    sums_step4<kClamp>(x, zbuf + j, vmb);
  }
  for (; j < len; j += 16) {
    // Masked tail: lanes past len hold m (d = 0, harmless) and are not added.
    const __mmask16 m = len - j >= 16 ? static_cast<__mmask16>(0xffff)
                                      : static_cast<__mmask16>((1u << (len - j)) - 1u);
    Sums512 t{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    sums_step<kClamp>(t, _mm512_mask_loadu_ps(vmb, m, zbuf + j), vmb);
    x.s = _mm512_mask_add_ps(x.s, m, x.s, t.s);
    x.a = _mm512_mask_add_ps(x.a, m, x.a, t.a);
    x.b = _mm512_mask_add_ps(x.b, m, x.b, t.b);
    x.q = _mm512_mask_add_ps(x.q, m, x.q, t.q);
  }
  out->s = reduce_pd(x.s);
  out->a = reduce_pd(x.a);
  out->b = reduce_pd(x.b);
  out->q = reduce_pd(x.q);
}

// The exp pass without the floor (15 vector operations per 16 columns instead of 16),
// run with flush-to-zero, falling back to the floored pass for this block and the rest
// of the chunk (`clamp` set) when the sum of e or of e·d comes out NaN or infinite.
//
// Why the unfloored pass is exact wherever its s is finite, for d = z − m <= 0:
// * −87.3 <= d: the floored pass's arithmetic, the same values.
// * −2.9e6 <= d < −87.3: n = round(d/ln2) in [−2^22, −126] (the 1.5·2^23 rounding still
//   works), |r| <= 0.36, e = p·2^n < 2^-125: a flushed 0 or ~1e-38, as the floor gives.
// * d < −2.9e6: n is not an integer any more, r = d − n·ln2 is garbage up to |d|·1e-7,
//   so p is huge, negative or infinite; but 2^n < 2^-4000000 makes e = ±0 for a finite
//   p, and an infinite p gives e = ±inf or NaN, which the check catches.
// * d = −inf (a masked column) makes r = −inf + inf = NaN, and e (0 or NaN) times d is
//   NaN; a NaN z gives NaN: caught in a, and the floored pass then takes −inf to the
//   floor and keeps NaN (the row is bad).
// Finite s and a therefore mean every e was accurate or negligible (< 1.5e-38) and every
// d finite, so b and q are finite and accurate too. Flush-to-zero is needed for speed only: without it every e below 2^-126 is a
// denormal result, i.e. a microcode assist of ~100 cycles. With a temperature it is set
// around this pass alone (`set_ftz`; two ldmxcsr cost ~40 cycles a block), as pass 1's
// z = x / T must keep denormal quotients; without one, chunk sets it once (FtzScope).
static void block_sums(const float* __restrict zbuf, int len, float mb, Partial* __restrict out,
                       const char* pf, const char* pf_end, bool& clamp, bool set_ftz) {
  if (!clamp) {
    const unsigned csr = _mm_getcsr();
    if (set_ftz) _mm_setcsr(csr | _MM_FLUSH_ZERO_ON);
    block_sums_avx512<false>(zbuf, len, mb, out, pf, pf_end);
    if (set_ftz) _mm_setcsr(csr);
    const double sa = out->s + out->a;  // s >= 0 >= a: finite iff both are
    if (sa - sa == 0.0) return;
    clamp = true;
    pf = pf_end;  // already prefetched
  }
  block_sums_avx512<true>(zbuf, len, mb, out, pf, pf_end);
}
#else
// `live` guards the terms that underflow (or are −inf): their d may be −inf or huge, and
// they must add exactly 0, never 0·inf. One compare masks both e and d.
// Kept out of line so that the vectoriser sees this loop alone: inlined into `chunk`,
// GCC unswitched the block loop and left the copy it took most often scalar.
__attribute__((noinline)) static void block_sums(const float* __restrict zbuf, int len, float mb,
                                                 Partial* __restrict out, const char*, const char*,
                                                 bool&, bool) {
  float s = 0.0f, a = 0.0f, b = 0.0f, q = 0.0f;
#pragma omp simd reduction(+ : s, a, b, q)
  for (int j = 0; j < len; ++j) {
    const float d = zbuf[j] - mb;
    const bool live = d >= kExpCutoff;
    const float e = live ? exp_core(d) : 0.0f;
    const float dz = live ? d : 0.0f;
    const float ed = e * dz;
    s += e;
    a += ed;
    b += ed * dz;
    q += e * e;
  }
  out->s = s;
  out->a = a;
  out->b = b;
  out->q = q;
}
#endif

// Index of the first z[j] == mb in a block that holds mb (its max). 16 columns per
// step: a scalar early-exit scan cost ~1000 cycles per searched block, a fifth of the
// kernel's time on a [1, 131072] row (measured with rdtsc on the AVX-512 build).
static int first_equal(const float* __restrict z, int len, float mb) {
  int j = 0;
#if defined(MLLMCAL_KERNEL_AVX512)
  const __m512 vmb = _mm512_set1_ps(mb);
  for (; j < len; j += 16) {
    const __mmask16 in = len - j >= 16 ? static_cast<__mmask16>(0xffff)
                                       : static_cast<__mmask16>((1u << (len - j)) - 1u);
    const __mmask16 eq =
        _mm512_mask_cmp_ps_mask(in, _mm512_maskz_loadu_ps(in, z + j), vmb, _CMP_EQ_OQ);
    if (eq) return j + __builtin_ctz(static_cast<unsigned>(eq));
  }
#else
  for (; j + 16 <= len; j += 16) {
    int any = 0;
    for (int k = 0; k < 16; ++k) any |= z[j + k] == mb;
    if (any) break;
  }
  for (; j < len; ++j) {
    if (z[j] == mb) return j;
  }
#endif
  return -1;  // not reached: mb is one of the z
}

#if defined(MLLMCAL_KERNEL_AVX512)
constexpr bool kNanFromSums = true;  // pass 1 ignores NaN; block_sums propagates it
#else
constexpr bool kNanFromSums = false;  // load_block reports NaN itself
#endif

// Flush-to-zero on the calling thread for a scope (AVX-512 build; see block_sums).
struct FtzScope {
#if defined(MLLMCAL_KERNEL_AVX512)
  explicit FtzScope(bool on) : csr(_mm_getcsr()), on(on) {
    if (on) _mm_setcsr(csr | _MM_FLUSH_ZERO_ON);
  }
  ~FtzScope() {
    if (on) _mm_setcsr(csr);
  }
  unsigned csr;
  bool on;
#else
  explicit FtzScope(bool) {}
#endif
};

// Whether any z of a block is NaN (z as pass 1 wrote or read it).
static bool block_has_nan(const float* z, int len) {
  int nan = 0;
  for (int j = 0; j < len; ++j) nan |= (z[j] != z[j]);
  return nan != 0;
}

template <int DT>
static void chunk(const void* x_row, int64_t c0, int64_t c1, float temperature, bool divide,
                  int64_t label, void* out_row, Partial* result) {
  using T = typename Io<DT>::T;
  const T* x = static_cast<const T*>(x_row);
  T* out = static_cast<T*>(out_row);
  alignas(64) float zbuf[kBlock];
  // fp32 read as is (no temperature, no scaled copy): both passes read x itself (the
  // block is in L1 for the second), no copy into zbuf.
  const bool in_place = DT == kF32 && !divide && out == nullptr;
  // Without a division nothing here rounds to a denormal but the exp pass's tiny e
  // (pass 1 only loads, widens exactly and takes maxima; the scaled copy is z itself).
  FtzScope ftz(!divide);
  Partial acc = empty_partial();
  bool clamp = false;  // the exp pass keeps its floor for the rest of the chunk (AVX-512)
  for (int64_t j0 = c0; j0 < c1; j0 += kBlock) {
    const int len = static_cast<int>(c1 - j0 < kBlock ? c1 - j0 : kBlock);
    int any_nan = 0;
    float mb;
    if (in_place) {
      mb = MLLMCAL_LOAD_BLOCK<DT, false, false>(x + j0, len, temperature, zbuf, &any_nan);
    } else {
      mb = divide ? MLLMCAL_LOAD_BLOCK<DT, true, true>(x + j0, len, temperature, zbuf, &any_nan)
                  : MLLMCAL_LOAD_BLOCK<DT, false, true>(x + j0, len, temperature, zbuf, &any_nan);
    }
    const float* z = in_place ? reinterpret_cast<const float*>(x + j0) : zbuf;
    // After the read of this block into zbuf, so `out` may alias `x`.
    if (out != nullptr) store_block<DT>(zbuf, len, out + j0);
    if (label >= j0 && label < j0 + len) {
      acc.z_label = z[label - j0];
      acc.has_label = true;
    }
    if (any_nan || mb == INFINITY) acc.bad = true;
    // A bad row's statistics are all NaN: only the scaled copy still has to be written.
    if (acc.bad) continue;
    // A block of only −inf carries no probability mass (but may hide a NaN, which the
    // AVX-512 pass 1 ignores: look for one, a rare scalar scan).
    if (mb == -INFINITY) {
      if (kNanFromSums && block_has_nan(z, len)) acc.bad = true;
      continue;
    }

    // A block whose max beats the chunk's so far moves the reference: the running sums
    // are rescaled to it (an exp in double) and it holds the lowest argmax. Only such a
    // block can, so this runs on few blocks per row: O(log blocks) on random rows.
    if (mb > acc.m) {
      rescale_to(acc, mb);
      acc.m = mb;
      acc.argmax = j0 + first_equal(z, len, mb);
    }
    // Pass 2 (from L1): e = exp(z − m) relative to the chunk's running max m >= mb, so
    // the block's sums add to the running ones as they are (no rescale per block),
    // while the next block is prefetched.
    const int64_t next = c1 - (j0 + len) < kBlock ? c1 - (j0 + len) : kBlock;
    const char* pf = reinterpret_cast<const char*>(x + j0 + len);
    Partial blk;
    block_sums(z, len, acc.m, &blk, pf, pf + next * static_cast<int64_t>(sizeof(T)), clamp, divide);
    if (kNanFromSums && !(blk.s == blk.s)) {  // a NaN z (see load_block_avx512)
      acc.bad = true;
      continue;
    }
    acc.s += blk.s;
    acc.a += blk.a;
    acc.b += blk.b;
    acc.q += blk.q;
  }
  *result = acc;
}

}  // namespace

#undef MLLMCAL_LOAD_BLOCK

static const KernelTable kTable = {
    MLLMCAL_ISA_NAME,
    {&chunk<kF32>, &chunk<kF16>, &chunk<kBF16>},
};
