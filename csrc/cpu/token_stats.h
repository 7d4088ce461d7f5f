// Fused per-row token statistics on the CPU: shared declarations.
//
// The kernel is split in two layers:
//
// * an ISA-specific *chunk* function (kernel_isa.h, compiled three times for generic
//   x86-64, x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512)) that reads columns
//   [c0, c1) of one row once and returns a `Partial` online-softmax state;
// * an ISA-neutral driver (token_stats.cpp) that plans the OpenMP work (one chunk per row,
//   or several per row when rows are few), merges partials and writes the outputs.
//
// Semantics are those of mllmcal/_contract.py. No torch headers: the module is built
// against raw pointers only.
#pragma once

#include <cstdint>

namespace mllmcal {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Online-softmax state of a set of columns, relative to its own maximum m:
//   s = Σ e_i,  a = Σ e_i d_i,  b = Σ e_i d_i²,  q = Σ e_i²,  with d_i = z_i − m, e_i = exp(d_i).
// Terms with e_i == 0 (masked −inf, or underflowed) are left out of a and b so that
// 0 · inf never appears (the AVX-512 build floors d at −87 instead, so such a term adds
// ~1e-38: see block_sums in kernel_isa.h). From the state of a whole row (S = s):
//   logsumexp = m + log S,  confidence = 1/S,  E_p[d] = a/S,  entropy = log S − a/S,
//   Var_p[z] = b/S − (a/S)²,  Σ p² = q/S².
// Sums are kept in double so that merging hundreds of block partials does not drift;
// each block's own sums are fp32 vector reductions over at most kBlock terms.
struct Partial {
  float m;          // max z over the columns (−inf when none is > −inf)
  int64_t argmax;   // lowest column index attaining m (−1 when m == −inf)
  double s, a, b, q;
  float z_label;    // z at the label column, when it lies in these columns
  bool has_label;
  bool bad;         // a NaN or +inf was seen: the row is invalid
};

// Reads columns [c0, c1) of one row (`x_row` points at column 0, in the dtype the
// table entry is for), computes z = x / temperature in fp32 (division skipped when
// `divide` is false, i.e. temperature == 1), optionally writes z, rounded to the same
// dtype, to `out_row` (may equal x_row), and returns the partial state.
// `label` is the label's column, or −1 for none.
using ChunkFn = void (*)(const void* x_row, int64_t c0, int64_t c1, float temperature,
                         bool divide, int64_t label, void* out_row, Partial* result);

struct KernelTable {
  const char* isa;
  ChunkFn chunk[3];  // indexed by DType
};

// One table per ISA; which ones exist depends on the compiler target (x86-64 gets all).
const KernelTable& kernels_generic();
#if defined(__x86_64__) && defined(__GNUC__)
#define MLLMCAL_HAVE_X86_CLONES 1
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#endif

// The table for this CPU (chosen once, at first use), or a forced one by name
// ("generic", "avx2", "avx512"; nullptr / "" = best available). Returns nullptr for a
// name this CPU cannot run.
const KernelTable* select_kernels(const char* isa);

// How to spread rows over threads.
enum Mode : int { kModeAuto = 0, kModeRows = 1, kModeSplit = 2 };

struct Args {
  const void* x;               // [n, v], x[i, j] at x + i * stride_x + j (elements)
  int dtype;                   // DType
  int64_t n, v, stride_x;
  const int64_t* labels;       // nullable
  int64_t ignore_index;
  float temperature;
  const float* temperature_rows;  // nullable
  float* fstats;               // [7, n]
  int64_t* pred;               // [n]
  uint8_t* flags;              // [n]
  void* scaled_out;            // nullable; [n, v] with stride_out
  int64_t stride_out;
  int64_t* hist;               // nullable; [3, n_bins]
  int64_t n_bins;
  int num_threads;             // <= 0: OpenMP default
  int mode;                    // Mode
  int64_t chunk_columns;       // <= 0: automatic; else the split path's chunk width
  const KernelTable* kernels;
};

void token_stats(const Args& args);

}  // namespace mllmcal
