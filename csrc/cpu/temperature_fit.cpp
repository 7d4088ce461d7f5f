// One-pass temperature fitting on the CPU; the maths is in temperature_fit.h.
//
// Plan: OpenMP over rows (the fit sees many rows). Per row, the logits are converted to
// fp32 once into a thread-local buffer (the only read of the row from memory), the max
// and the validity flags come from one pass over it, and then the buffer is re-read from
// cache in tiles of kTile columns: for each tile, every temperature's (S, A, B) gets a
// vector-reduced fp32 partial that is added to fp32 per-temperature sums. Tiling keeps
// the tile in L1 while the K exps run over it, and the per-tile partials keep fp32
// rounding error at O(kTile) terms per sum, not O(V).
//
// The exp would be evaluated K times per element (Newton needs one per element per pass,
// but several passes); temperatures whose beta doubles an earlier one square its exps
// instead (see Step below), which cuts the default grid's exps to about a quarter.
#include "cpu/temperature_fit.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace mllmcal {
namespace {

constexpr int64_t kTile = 1024;

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(t) for t <= 0 as a branch-free polynomial the vectoriser can inline (the libm call
// blocks vectorisation without -ffast-math). Range reduction t = j ln2 + r, |r| <= ln2/2,
// exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7 on that interval), 2^j
// added to the exponent field. Below -87 (2^-125.5, under the smallest normal float that
// matters next to the row maximum's term 1) the caller selects 0.
__attribute__((always_inline)) inline float exp_nonpos(float t) {
  t = t < -87.0f ? -87.0f : t;
  const float j = std::nearbyint(t * 1.4426950408889634f);
  const float r = (t - j * 0.693145751953125f) - j * 1.4286068203094172e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return from_bits(bits(p) + (static_cast<uint32_t>(static_cast<int32_t>(j)) << 23));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;
  uint32_t out;
  if (mag >= 0x7c00u) {
    out = (mag << 13) | 0x7f800000u;  // inf / NaN, payload kept
  } else if (mag >= 0x0400u) {
    out = (mag << 13) + (112u << 23);  // normal: exponent bias 15 -> 127
  } else {
    out = bits(static_cast<float>(mag) * 5.9604644775390625e-8f);  // subnormal: mag * 2^-24
  }
  return from_bits(out | sign);
}

void load_row(const void* x, int dtype, int64_t v, float* buf) {
  if (dtype == 0) {
    std::memcpy(buf, x, static_cast<size_t>(v) * sizeof(float));
  } else if (dtype == 1) {
    const uint16_t* h = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < v; ++i) buf[i] = half_bits_to_float(h[i]);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(x);
#pragma omp simd
    for (int64_t i = 0; i < v; ++i) buf[i] = from_bits(static_cast<uint32_t>(h[i]) << 16);
  }
}

// One step of the plan: temperature `k`, its e_i either from exp(beta_k d_i) or, when
// beta_k = 2 beta_{previous step} exactly, by squaring the previous step's e_i:
// exp(2 beta d) = exp(beta d)^2, one multiply instead of an exp. Each squaring doubles the
// relative rounding error of e, so a chain re-seeds with a real exp every kReseed steps
// (error <= 2^kReseed ulp ~ 1e-6). The default one-pass grid (three temperatures per
// octave, mllmcal.calibration.onepass) is built so that 3 in 4 of its e's are squares.
struct Step {
  int64_t k;
  bool square;
};
constexpr int kReseed = 4;

// The hot loops, compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load
// time (GCC function multi-versioning), so the wheel runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MLLMCAL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MLLMCAL_CLONES
#endif

// One element's contribution. kSquare: e = e_prev^2 (e_buf holds e_prev); else
// e = exp(beta d). Either way e is stored back to e_buf for the next step of the chain.
template <bool kSquare>
__attribute__((always_inline)) inline void term(float di, float beta, float& eb, float& s,
                                                float& a, float& b) {
  float e, dd;
  if (kSquare) {
    e = eb * eb;
    dd = e > 0.0f ? di : 0.0f;  // 0 * inf guard (masked d = -inf has e = 0)
  } else {
    const float t = beta * di;
    const bool live = t >= -87.0f;  // false for d = -inf: the term is exactly 0
    e = live ? exp_nonpos(t) : 0.0f;
    dd = live ? di : 0.0f;
  }
  eb = e;
  s += e;
  a += e * dd;
  b += e * dd * dd;
}

// (S, A, B) of one tile at one temperature. The sums run in kLanes independent
// accumulators (4 AVX-512 vectors each): a single vector accumulator would make the loop
// wait on the add latency of its three reduction chains, and hide whatever the exp costs.
template <bool kSquare>
__attribute__((always_inline)) inline void tile_step(const float* d, float* e_buf, int64_t len,
                                                     float beta, float* out_s, float* out_a,
                                                     float* out_b) {
  constexpr int kLanes = 64;
  float s[kLanes] = {}, a[kLanes] = {}, b[kLanes] = {};
  const int64_t full = len / kLanes * kLanes;
  for (int64_t i0 = 0; i0 < full; i0 += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) term<kSquare>(d[i0 + l], beta, e_buf[i0 + l], s[l], a[l], b[l]);
  }
  for (int64_t i = full; i < len; ++i) term<kSquare>(d[i], beta, e_buf[i], s[0], a[0], b[0]);
  float ts = 0.0f, ta = 0.0f, tb = 0.0f;
#pragma omp simd reduction(+ : ts, ta, tb)
  for (int l = 0; l < kLanes; ++l) {
    ts += s[l];
    ta += a[l];
    tb += b[l];
  }
  *out_s += ts;
  *out_a += ta;
  *out_b += tb;
}

MLLMCAL_CLONES
void tile_sums(const float* d, int64_t len, const float* betas, const Step* plan, int64_t k,
               float* e_buf, float* s_acc, float* a_acc, float* b_acc) {
  // A tile whose largest d gives beta d < -87 adds nothing at that temperature (every
  // term is 0), nor at the larger betas later in its chain: skip it. With peaked rows this
  // drops most of the small-T work.
  float dmax = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : dmax)
  for (int64_t i = 0; i < len; ++i) dmax = d[i] > dmax ? d[i] : dmax;
  for (int64_t j = 0; j < k; ++j) {
    const Step st = plan[j];
    if (!(betas[st.k] * dmax >= -87.0f)) continue;
    if (st.square)
      tile_step<true>(d, e_buf, len, 0.0f, s_acc + st.k, a_acc + st.k, b_acc + st.k);
    else
      tile_step<false>(d, e_buf, len, betas[st.k], s_acc + st.k, a_acc + st.k, b_acc + st.k);
  }
}

// Order the temperatures into doubling chains (beta, 2 beta, 4 beta, ...; exact fp32
// equality) and mark which steps may square the previous one.
std::vector<Step> make_plan(const float* betas, int64_t k) {
  std::vector<int64_t> child(static_cast<size_t>(k), -1);
  std::vector<bool> has_parent(static_cast<size_t>(k), false);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      if (betas[j] == 2.0f * betas[i] && child[i] < 0 && !has_parent[j]) {
        child[i] = j;
        has_parent[j] = true;
      }
  std::vector<Step> plan;
  plan.reserve(static_cast<size_t>(k));
  for (int64_t r = 0; r < k; ++r) {
    if (has_parent[r]) continue;
    int depth = 0;
    for (int64_t j = r; j >= 0; j = child[j], ++depth)
      plan.push_back(Step{j, depth % kReseed != 0});
  }
  return plan;
}

void fit_row(const FitArgs& a, const Step* plan, int64_t row, std::vector<float>& buf,
             std::vector<float>& acc, std::vector<float>& e_buf) {
  float* out = a.out + row * 3 * a.k;
  std::fill(out, out + 3 * a.k, 0.0f);
  const int64_t y = a.labels[row];
  if (y == a.ignore_index) {
    a.status[row] = kFitSkipped;
    return;
  }
  const int64_t elem = a.dtype == 0 ? 4 : 2;
  const char* xrow = static_cast<const char*>(a.x) + row * a.stride_x * elem;
  float* d = buf.data();
  load_row(xrow, a.dtype, a.v, d);
  float m = -std::numeric_limits<float>::infinity();
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t i = 0; i < a.v; ++i) {
    bad |= (d[i] != d[i]) | (d[i] == std::numeric_limits<float>::infinity());
    m = d[i] > m ? d[i] : m;
  }
  if (bad || m == -std::numeric_limits<float>::infinity()) {
    a.status[row] = kFitSkipped;
    return;
  }
  const float dy = d[y] - m;  // fp32, like every d_i
  if (dy == -std::numeric_limits<float>::infinity()) {
    a.status[row] = kFitMaskedLabel;
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < a.v; ++i) d[i] -= m;
  float* s = acc.data();
  float* sa = s + a.k;
  float* sb = sa + a.k;
  std::fill(s, s + 3 * a.k, 0.0f);
  for (int64_t c = 0; c < a.v; c += kTile)
    tile_sums(d + c, std::min(kTile, a.v - c), a.betas, plan, a.k, e_buf.data(), s, sa, sb);
  for (int64_t j = 0; j < a.k; ++j) {
    const double S = s[j], mean = sa[j] / S;
    out[j] = static_cast<float>(std::log(S) - static_cast<double>(a.betas[j]) * dy);
    out[a.k + j] = static_cast<float>(mean - dy);
    out[2 * a.k + j] = static_cast<float>(std::max(0.0, sb[j] / S - mean * mean));
  }
  a.status[row] = kFitUsed;
}

}  // namespace

void temperature_fit(const FitArgs& a) {
  const int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  const std::vector<Step> plan = make_plan(a.betas, a.k);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf(static_cast<size_t>(a.v));
    std::vector<float> acc(static_cast<size_t>(3 * a.k));
    std::vector<float> e_buf(static_cast<size_t>(kTile));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < a.n; ++row) fit_row(a, plan.data(), row, buf, acc, e_buf);
  }
}

}  // namespace mllmcal
