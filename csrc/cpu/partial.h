// Merging online-softmax partial states (see `Partial` in token_stats.h).
//
// The rescaling of running sums to a new maximum is the online softmax of Milakov and
// Gimelshein, "Online normalizer calculation for softmax" (2018),
// https://arxiv.org/abs/1805.02867; the merge of two partial states is its associative
// form, as used by FlashAttention's split-K (Dao et al. 2022, https://arxiv.org/abs/2205.14135).
//
// Every function here is `static inline`: this header is included both by the
// ISA-specific kernel translation units (compiled under `#pragma GCC target`) and by the
// generic driver. Internal linkage gives each translation unit its own copy, so the linker
// can never hand an AVX-512 copy to generic code (the COMDAT pitfall of inline functions
// compiled under different targets).
#pragma once

#include <cmath>
#include <cstdint>

#include "token_stats.h"

namespace mllmcal {
namespace {

static inline Partial empty_partial() {
  Partial p;
  p.m = -INFINITY;
  p.argmax = -1;
  p.s = p.a = p.b = p.q = 0.0;
  p.z_label = 0.0f;
  p.has_label = false;
  p.bad = false;
  return p;
}

// Re-expresses a state relative to a larger maximum M >= p.m.
//
// With δ = M − m >= 0 and r = exp(−δ), every term moves as e'_i = r·e_i, d'_i = d_i − δ:
//   s' = Σ r e_i                = r s
//   a' = Σ r e_i (d_i − δ)      = r (a − δ s)
//   b' = Σ r e_i (d_i − δ)²     = r (b − 2δ a + δ² s)
//   q' = Σ r² e_i²              = r² q
// Since d_i <= 0 we have a <= 0, so a − δs and b − 2δa + δ²s are sums of same-signed
// terms: no cancellation. δ is at most ~6.8e38 (fp32 range), so δ² s stays far below the
// double range. When r underflows the old columns are negligible next to the new max
// (their weight is < 1e-300 of it) and the state is simply cleared.
static inline void rescale_to(Partial& p, double M) {
  if (p.s == 0.0) return;  // nothing to rescale (also the −inf max of an empty state)
  const double delta = M - static_cast<double>(p.m);
  if (delta == 0.0) return;
  const double r = std::exp(-delta);
  if (r == 0.0) {
    p.s = p.a = p.b = p.q = 0.0;
    return;
  }
  const double b = p.b - 2.0 * delta * p.a + delta * delta * p.s;
  const double a = p.a - delta * p.s;
  p.s *= r;
  p.a = r * a;
  p.b = r * b;
  p.q *= r * r;
}

// acc <- acc ∪ rhs, where every column of rhs comes after every column of acc, so on a
// tie of maxima acc's (lower) argmax is kept: the lowest index wins overall.
static inline void merge_into(Partial& acc, const Partial& rhs) {
  acc.bad = acc.bad || rhs.bad;
  if (rhs.has_label) {
    acc.z_label = rhs.z_label;
    acc.has_label = true;
  }
  if (rhs.s == 0.0) return;  // rhs holds only −inf (or nothing): contributes no mass
  if (acc.s == 0.0) {
    acc.m = rhs.m;
    acc.argmax = rhs.argmax;
    acc.s = rhs.s;
    acc.a = rhs.a;
    acc.b = rhs.b;
    acc.q = rhs.q;
    return;
  }
  Partial r = rhs;
  if (r.m > acc.m) {
    rescale_to(acc, r.m);
    acc.m = r.m;
    acc.argmax = r.argmax;
  } else {
    rescale_to(r, acc.m);
  }
  acc.s += r.s;
  acc.a += r.a;
  acc.b += r.b;
  acc.q += r.q;
}

}  // namespace
}  // namespace mllmcal
