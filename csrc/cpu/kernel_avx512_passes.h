// The AVX-512 passes of the chunk kernel: pass 1 (load_block_avx512) and the exp pass
// (block_sums), in intrinsics. Included by kernel_isa.h inside the ISA namespace of
// kernel_avx512.cpp only, under its `#pragma GCC target`; NO include guard, like
// kernel_isa.h. The generic and AVX2 builds use the portable loops there.

// Loads widened to fp32 in registers: bf16 is a 16-bit shift of the zero-extended
// halves (see load32 for the unmasked loop); fp16 is vcvtph2ps (exact, subnormals
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

// The exp pass (most of the kernel's time): d = z − m, e = 2^n · e^r with
// n = round(d / ln2), r = d − n·ln2, e^r a degree-5 minimax polynomial (relative error
// 1.3e-7 on |r| <= ln2/2, fitted in fp32 coefficients) and the 2^n scaling by vscalefps;
// then s += e, a += e·d, b = fma(e·d, d, b), q = fma(e, e, q). 15 vector operations per
// 16 columns (loads folded into them), against 30 with exp_core and its selects.
//
// d is first floored at kDFloor only when a block needs it (see block_sums below):
// with the floor, a term with d < kDFloor (−inf included) adds e = e^kDFloor ≈ 1.6e-38
// and e·d, e·d² below 2e-34, i.e. nothing next to the maximum's term 1 (a sum of 2^31
// of them is still 1e-24), and every value stays a normal float.
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

template <bool kClamp, bool kQ>
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
  if (kQ) acc.q = _mm512_fmadd_ps(e, e, acc.q);
}

// sums_step on four vectors, written operation by operation across the four so that
// independent work is adjacent in the instruction stream.
template <bool kClamp, bool kQ>
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
    if (kQ) acc.q = _mm512_fmadd_ps(e[k], e[k], acc.q);
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
// kQ: whether q = Σ e² is wanted (only a row with a label uses it, for the Brier
// score; without one the pass saves one operation per 16 columns and q stays 0).
template <bool kClamp, bool kQ>
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
    sums_step4<kClamp, kQ>(x, zbuf + j, vmb);
  }
  for (; j < len; j += 16) {
    // Masked tail: lanes past len hold m (d = 0, harmless) and are not added.
    const __mmask16 m = len - j >= 16 ? static_cast<__mmask16>(0xffff)
                                      : static_cast<__mmask16>((1u << (len - j)) - 1u);
    Sums512 t{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    sums_step<kClamp, kQ>(t, _mm512_mask_loadu_ps(vmb, m, zbuf + j), vmb);
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
template <bool kClamp>
static inline void block_sums_q(const float* __restrict zbuf, int len, float mb,
                                Partial* __restrict out, const char* pf, const char* pf_end,
                                bool need_q) {
  if (need_q) {
    block_sums_avx512<kClamp, true>(zbuf, len, mb, out, pf, pf_end);
  } else {
    block_sums_avx512<kClamp, false>(zbuf, len, mb, out, pf, pf_end);
  }
}

static void block_sums(const float* __restrict zbuf, int len, float mb, Partial* __restrict out,
                       const char* pf, const char* pf_end, bool& clamp, bool set_ftz,
                       bool need_q) {
  if (!clamp) {
    const unsigned csr = set_ftz ? _mm_getcsr() : 0u;
    if (set_ftz) _mm_setcsr(csr | _MM_FLUSH_ZERO_ON);
    block_sums_q<false>(zbuf, len, mb, out, pf, pf_end, need_q);
    if (set_ftz) _mm_setcsr(csr);
    const double sa = out->s + out->a;  // s >= 0 >= a: finite iff both are
    if (sa - sa == 0.0) return;
    clamp = true;
    pf = pf_end;  // already prefetched
  }
  block_sums_q<true>(zbuf, len, mb, out, pf, pf_end, need_q);
}
