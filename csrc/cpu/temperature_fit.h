// One-pass temperature fitting on the CPU: per-row NLL and its first two derivatives in
// beta = 1/T at K temperatures, from one read of each logits row.
//
// Maths (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, for
// temperature scaling; the derivatives are those of a log-partition function, e.g.
// Wainwright & Jordan 2008, Prop. 3.1). For a row x with label y and p = softmax(beta x):
//
//   l(beta)      = logsumexp(beta x) - beta x_y
//   dl/dbeta     = E_p[x] - x_y                 (d/dbeta logsumexp(beta x) = E_p[x])
//   d2l/dbeta2   = Var_p[x] >= 0                (so l is convex in beta)
//
// All three are shift-invariant in x, so with m = max_i x_i and d_i = x_i - m <= 0
// (computed once per row, in fp32), and e_i = exp(beta d_i) <= 1:
//
//   S = sum e_i,  A = sum e_i d_i,  B = sum e_i d_i^2
//   l = log S - beta d_y,   dl/dbeta = A/S - d_y,   d2l/dbeta2 = B/S - (A/S)^2
//
// Because beta > 0 the maximum of beta x is beta m at every temperature, so one max pass
// serves all K temperatures and no online rescaling is needed. Terms with e_i == 0
// (masked -inf entries, or underflow) are left out of A and B so 0 * inf never appears.
#pragma once

#include <cstdint>

namespace mllmcal {

// Row status written by temperature_fit (the same codes for every backend).
enum FitStatus : uint8_t {
  kFitSkipped = 0,      // invalid row (NaN, +inf, all -inf) or ignored label: out row = 0
  kFitUsed = 1,         // out row holds (l, dl/dbeta, d2l/dbeta2) at each temperature
  kFitMaskedLabel = 2,  // label logit is -inf (probability 0 at every T): out row = 0
};

struct FitArgs {
  const void* x;          // [n, v] logits, dtype code as token_stats (0 fp32, 1 fp16, 2 bf16)
  int dtype;
  int64_t n, v, stride_x;
  const int64_t* labels;  // [n], values in [0, v) or ignore_index (checked by the caller)
  int64_t ignore_index;
  const float* betas;     // [k] inverse temperatures, all > 0
  int64_t k;
  float* out;             // [n, 3, k]: l, dl/dbeta, d2l/dbeta2 per row and temperature
  uint8_t* status;        // [n]
  int num_threads;        // <= 0: OpenMP default
};

void temperature_fit(const FitArgs& a);

}  // namespace mllmcal
