// Host-side interface of the CUDA token-statistics kernel.
//
// Torch-free and CUDA-header-free on purpose: bindings.cpp is compiled by the host C++
// compiler and only sees plain pointers, integers and an opaque stream handle. The
// semantics of every buffer are those of mllmcal/_contract.py.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mllmcal_cuda {

// dtype codes of the logits (and of scaled_out, which has the logits' dtype).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Threads per block of the row kernel; the split-vocabulary merge needs splits <= this.
constexpr int kThreads = 256;
constexpr int kMaxSplits = kThreads;

struct TokenStatsArgs {
  const void* x;               // [n, v] logits, x[i, j] at x + i * stride_x + j (elements)
  int dtype;                   // DType
  int64_t n, v, stride_x;
  const int64_t* labels;       // [n] or nullptr
  int64_t ignore_index;
  float temperature;           // used when temperature_rows is nullptr
  const float* temperature_rows;  // [n] or nullptr
  float* fstats;               // [7, n]
  int64_t* pred;               // [n]
  uint8_t* flags;              // [n]
  void* scaled_out;            // [n, v] of dtype or nullptr; may alias x
  int64_t stride_out;
  int64_t* hist;               // [3, n_bins] int64, added to; or nullptr
  int n_bins;
  void* workspace;             // workspace_bytes(n, splits) bytes, zeroed once; or nullptr
  int splits;                  // 1: one block per row (path A); > 1: split vocabulary (path B)
  void* stream;                // cudaStream_t
};

// Bytes of workspace the split path needs: per-row arrival counters (which the kernel
// returns to zero, so a zeroed buffer can be reused on the same stream) and the partials.
size_t workspace_bytes(int64_t n, int splits);

// Launches the kernel on args.stream. Returns nullptr on success, else a static message
// (a bad argument, or cudaGetErrorString of the launch error).
const char* token_stats(const TokenStatsArgs& args);

}  // namespace mllmcal_cuda
