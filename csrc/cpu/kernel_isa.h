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
// passes (kernel_avx512_passes.h) and the argmax search with intrinsics, where GCC's
// vectorisation left most of the time on the table: one dependency chain per reduction,
// selects around the exp (profile in bench/NOTES.md).

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

// The scaled copy: zbuf rounded to the output dtype.
template <int DT>
__attribute__((noinline)) static void store_block(const float* __restrict zbuf, int len,
                                                  typename Io<DT>::T* __restrict ob) {
#pragma omp simd
  for (int j = 0; j < len; ++j) ob[j] = Io<DT>::store(zbuf[j]);
}

// e = exp(z − m) over one block and the sums s, a, b, q relative to m (any m >= the block max).
#if defined(MLLMCAL_KERNEL_AVX512)
#include "cpu/kernel_avx512_passes.h"  // load_block_avx512, block_sums
#define MLLMCAL_LOAD_BLOCK load_block_avx512
#else
#define MLLMCAL_LOAD_BLOCK load_block
// `live` guards the terms that underflow (or are −inf): their d may be −inf or huge, and
// they must add exactly 0, never 0·inf. One compare masks both e and d.
// Kept out of line so that the vectoriser sees this loop alone: inlined into `chunk`,
// GCC unswitched the block loop and left the copy it took most often scalar.
__attribute__((noinline)) static void block_sums(const float* __restrict zbuf, int len, float mb,
                                                 Partial* __restrict out, const char*, const char*,
                                                 bool&, bool, bool) {
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
  // In place, the argmax is searched once, at the end, in the last block that raised the
  // max (x is still there; zbuf would not be): a row raises it O(log blocks) times, and
  // each search scans a block.
  int64_t max_block = -1;
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
      if (in_place) {
        max_block = j0;
      } else {
        acc.argmax = j0 + first_equal(z, len, mb);
      }
    }
    // Pass 2 (from L1): e = exp(z − m) relative to the chunk's running max m >= mb, so
    // the block's sums add to the running ones as they are (no rescale per block),
    // while the next block is prefetched.
    const int64_t next = c1 - (j0 + len) < kBlock ? c1 - (j0 + len) : kBlock;
    const char* pf = reinterpret_cast<const char*>(x + j0 + len);
    Partial blk;
    block_sums(z, len, acc.m, &blk, pf, pf + next * static_cast<int64_t>(sizeof(T)), clamp, divide,
               label >= 0);
    if (kNanFromSums && !(blk.s == blk.s)) {  // a NaN z (see load_block_avx512)
      acc.bad = true;
      continue;
    }
    acc.s += blk.s;
    acc.a += blk.a;
    acc.b += blk.b;
    acc.q += blk.q;
  }
  if constexpr (DT == kF32) {  // in place (the only case that sets max_block) is fp32
    if (max_block >= 0) {
      const int len = static_cast<int>(c1 - max_block < kBlock ? c1 - max_block : kBlock);
      acc.argmax = max_block + first_equal(x + max_block, len, acc.m);
    }
  }
  *result = acc;
}

}  // namespace

#undef MLLMCAL_LOAD_BLOCK

static const KernelTable kTable = {
    MLLMCAL_ISA_NAME,
    {&chunk<kF32>, &chunk<kF16>, &chunk<kBF16>},
};
