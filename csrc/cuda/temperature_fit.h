// Host-side interface of the CUDA one-pass temperature-fit kernel (maths in
// csrc/cpu/temperature_fit.h and mllmcal/kernels/temperature_fit.py).
//
// Torch-free and CUDA-header-free: the binding is compiled by the host C++ compiler and
// sees plain pointers, integers and an opaque stream handle.
#pragma once

#include <cstdint>

namespace mllmcal_cuda {

struct TemperatureFitArgs {
  const void* x;          // [n, v] logits, x[i, j] at x + i * stride_x + j (elements)
  int dtype;              // 0 fp32, 1 fp16, 2 bf16
  int64_t n, v, stride_x;
  const int64_t* labels;  // [n], in [0, v) or ignore_index
  int64_t ignore_index;
  const float* betas;     // [k] inverse temperatures > 0
  int64_t k;
  float* out;             // [n, 3, k]: nll, dnll/dbeta, d2nll/dbeta2 (0 where not used)
  uint8_t* status;        // [n]: 0 skipped, 1 used, 2 label masked
  void* stream;           // cudaStream_t
};

// Temperatures per block: each thread keeps (S, A, B) for this many in registers.
constexpr int kFitTempsPerBlock = 8;
constexpr int kFitThreads = 256;

// Launches on args.stream; nullptr on success, else a static error message.
const char* temperature_fit(const TemperatureFitArgs& args);

}  // namespace mllmcal_cuda
