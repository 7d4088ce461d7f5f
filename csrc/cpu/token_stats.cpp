// The ISA-neutral driver of the CPU token-statistics kernel: work planning over the
// threads of split_pool.h (OpenMP only gives the default thread count), merging of split
// rows, the per-row epilogue and the histogram.
#include "cpu/token_stats.h"

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/partial.h"
#include "cpu/split_pool.h"

namespace mllmcal {

// Field rows of fstats, as in mllmcal/_contract.py.
enum Field : int { kLSE = 0, kCONF, kENT, kLABEL_LOGPROB, kBRIER, kMEAN, kVAR, kNumFields };
constexpr uint8_t kFlagValid = 1;
constexpr uint8_t kFlagCorrect = 2;

// Below this many elements a call is done by the calling thread alone: waking a team
// costs more than the work.
constexpr int64_t kMinParallelElements = int64_t{1} << 15;
// Smallest vocabulary chunk the automatic split makes (8 blocks of kBlock columns):
// each chunk pays a partial merge and a share of the team wake-up.
constexpr int64_t kMinChunkColumns = 16384;
constexpr int64_t kChunksPerThread = 4;
// Smallest work item of the rows path (rows of fewer columns are grouped).
constexpr int64_t kMinItemElements = 8192;

const KernelTable* select_kernels(const char* isa) {
  const bool any = isa == nullptr || isa[0] == '\0';
#if defined(MLLMCAL_HAVE_X86_CLONES)
  __builtin_cpu_init();
  const bool v4 = __builtin_cpu_supports("x86-64-v4");
  const bool v3 = __builtin_cpu_supports("x86-64-v3");
  if ((any && v4) || (!any && std::strcmp(isa, "avx512") == 0)) return v4 ? &kernels_avx512() : nullptr;
  if ((any && v3) || (!any && std::strcmp(isa, "avx2") == 0)) return v3 ? &kernels_avx2() : nullptr;
#endif
  if (any || std::strcmp(isa, "generic") == 0) return &kernels_generic();
  return nullptr;
}

namespace {

struct Plan {
  int64_t chunks;  // chunks per row
  int64_t width;   // columns per chunk
  int threads;
};

// Path A (rows): one chunk per row, rows claimed by the threads of split_pool.h.
// Serves N >= threads, where each thread has whole rows of work.
// Path B (split): when there are fewer rows than threads, each row's vocabulary is cut
// into column ranges, about kChunksPerThread per thread so that a helper that starts
// late leaves its share to the others (split_pool.h), every chunk yields a partial
// state, and the partials of a row are merged in column order (merge_into). The chunk
// width is a multiple of the kernel's block so chunk edges fall on block edges.
Plan make_plan(const Args& A) {
  int threads = A.num_threads > 0 ? A.num_threads : omp_get_max_threads();
  if (threads < 1) threads = 1;
  const bool tiny = A.n * A.v < kMinParallelElements;
  if (A.mode == kModeAuto && tiny) threads = 1;
  Plan p{1, A.v, threads};
  const bool split = A.mode == kModeSplit || (A.mode == kModeAuto && A.n < threads);
  if (split) {
    int64_t width;
    if (A.chunk_columns > 0) {
      width = A.chunk_columns;
    } else {
      const int64_t per_row = (kChunksPerThread * threads + A.n - 1) / A.n;
      width = (A.v + per_row - 1) / per_row;
      if (A.mode == kModeAuto && width < kMinChunkColumns) width = kMinChunkColumns;
      width = (width + 2047) / 2048 * 2048;
    }
    if (width < A.v) {
      p.width = width;
      p.chunks = (A.v + width - 1) / width;
    }
  }
  const int64_t work = A.n * p.chunks;
  if (work < p.threads) p.threads = static_cast<int>(work < 1 ? 1 : work);
  return p;
}

inline int64_t label_column(const Args& A, int64_t i) {
  if (A.labels == nullptr) return -1;
  const int64_t y = A.labels[i];
  return y == A.ignore_index ? -1 : y;
}

inline float row_temperature(const Args& A, int64_t i) {
  return A.temperature_rows != nullptr ? A.temperature_rows[i] : A.temperature;
}

inline size_t elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

void run_chunk(const Args& A, ChunkFn fn, int64_t i, int64_t c0, int64_t c1, Partial* out) {
  // int64 offsets throughout: i · row_stride can exceed 2^31 elements.
  const size_t es = elem_size(A.dtype);
  const char* x_row = static_cast<const char*>(A.x) + static_cast<size_t>(i * A.stride_x) * es;
  void* out_row = A.scaled_out == nullptr
                      ? nullptr
                      : static_cast<char*>(A.scaled_out) + static_cast<size_t>(i * A.stride_out) * es;
  const float t = row_temperature(A, i);
  fn(x_row, c0, c1, t, t != 1.0f, label_column(A, i), out_row, out);
}

// Turns a row's merged state into its outputs (formulas in token_stats.h).
void finalize_row(const Args& A, int64_t i, const Partial& p) {
  float* F = A.fstats;
  const int64_t n = A.n;
  const bool valid = !p.bad && std::isfinite(p.m);
  if (!valid) {
    for (int k = 0; k < kNumFields; ++k) F[k * n + i] = NAN;
    A.pred[i] = -1;
    A.flags[i] = 0;
    return;
  }
  const double m = p.m;
  const double S = p.s;  // >= 1: the max term contributes exp(0)
  const double log_s = std::log(S);
  const double mean_d = p.a / S;
  double var = p.b / S - mean_d * mean_d;
  if (var < 0.0) var = 0.0;  // rounding of a (near-)zero variance
  F[kLSE * n + i] = static_cast<float>(m + log_s);
  F[kCONF * n + i] = static_cast<float>(1.0 / S);
  F[kENT * n + i] = static_cast<float>(log_s - mean_d);
  F[kMEAN * n + i] = static_cast<float>(m + mean_d);
  F[kVAR * n + i] = static_cast<float>(var);
  A.pred[i] = p.argmax;
  uint8_t flags = kFlagValid;
  const int64_t y = label_column(A, i);
  if (y >= 0 && p.has_label) {
    // log p_y from z_y − m (not z_y − logsumexp): with |z| ~ 1e30, m + log S has lost log S.
    const double lp = (static_cast<double>(p.z_label) - m) - log_s;
    const double py = std::exp(lp);
    F[kLABEL_LOGPROB * n + i] = static_cast<float>(lp);
    F[kBRIER * n + i] = static_cast<float>(p.q / (S * S) - 2.0 * py + 1.0);
    if (p.argmax == y) flags |= kFlagCorrect;
  } else {
    F[kLABEL_LOGPROB * n + i] = NAN;
    F[kBRIER * n + i] = NAN;
  }
  A.flags[i] = flags;
}

// Integer adds in row order after all rows are final: exact, so the result cannot depend
// on threads or on how callers split their batches.
void add_histogram(const Args& A) {
  const int64_t nb = A.n_bins;
  int64_t* count = A.hist;
  int64_t* sum_conf = A.hist + nb;
  int64_t* sum_correct = A.hist + 2 * nb;
  for (int64_t i = 0; i < A.n; ++i) {
    if (!(A.flags[i] & kFlagValid) || label_column(A, i) < 0) continue;
    const float conf = A.fstats[kCONF * A.n + i];
    const float scaled = conf * static_cast<float>(nb);  // the product in fp32, as the contract says
    int64_t b = static_cast<int64_t>(std::floor(scaled));
    if (b > nb - 1) b = nb - 1;
    if (b < 0) b = 0;
    count[b] += 1;
    // conf * 2^32 is exact in double; nearbyint rounds half to even like torch.round.
    sum_conf[b] += static_cast<int64_t>(std::nearbyint(static_cast<double>(conf) * 4294967296.0));
    sum_correct[b] += (A.flags[i] & kFlagCorrect) ? 1 : 0;
  }
}

}  // namespace

void token_stats(const Args& A) {
  if (A.n <= 0) return;
  const ChunkFn fn = A.kernels->chunk[A.dtype];
  const Plan plan = make_plan(A);
  if (plan.chunks == 1) {
    // Whole rows, in groups of at least kMinItemElements so that claiming an item costs
    // nothing next to its work, claimed by the caller and the pool's helpers. Not an
    // OpenMP `parallel for`: its closing barrier waits for every team thread, and inside
    // a serving engine (or on any busy machine) the second core is often taken, so a
    // 2-thread [16, 32000] call took 16-21 ms there against 0.35 ms alone (measured with
    // bench/bench_inengine.py). Here the caller never waits for a helper that has not
    // started: at worst it does all rows itself, at the one-thread speed.
    const int64_t rows = A.v >= kMinItemElements ? 1 : kMinItemElements / A.v;
    const int64_t items = (A.n + rows - 1) / rows;
    split_pool_run(items, plan.threads, [&](int64_t w) {
      const int64_t i1 = (w + 1) * rows < A.n ? (w + 1) * rows : A.n;
      for (int64_t i = w * rows; i < i1; ++i) {
        Partial p;
        run_chunk(A, fn, i, 0, A.v, &p);
        finalize_row(A, i, p);
      }
    }, A.n * A.v);
  } else {
    std::vector<Partial> parts(static_cast<size_t>(A.n * plan.chunks));
    split_pool_run(A.n * plan.chunks, plan.threads, [&](int64_t w) {
      const int64_t i = w / plan.chunks;
      const int64_t c0 = (w % plan.chunks) * plan.width;
      const int64_t c1 = c0 + plan.width < A.v ? c0 + plan.width : A.v;
      run_chunk(A, fn, i, c0, c1, &parts[static_cast<size_t>(w)]);
    }, A.n * A.v);
    for (int64_t i = 0; i < A.n; ++i) {
      Partial acc = parts[static_cast<size_t>(i * plan.chunks)];
      for (int64_t c = 1; c < plan.chunks; ++c) merge_into(acc, parts[static_cast<size_t>(i * plan.chunks + c)]);
      finalize_row(A, i, acc);
    }
  }
  if (A.hist != nullptr && A.labels != nullptr && A.n_bins > 0) add_histogram(A);
}

}  // namespace mllmcal
