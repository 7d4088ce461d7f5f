// CUDA kernel for one-pass temperature fitting: per row and temperature, the NLL of
// softmax(beta x) and its first two derivatives in beta (maths: csrc/cpu/temperature_fit.h;
// Guo et al. 2017 for temperature scaling, https://arxiv.org/abs/1706.04599):
//
//   m = max x,  d_i = x_i - m,  e_i = exp(beta d_i)
//   S = sum e,  A = sum e d,  B = sum e d^2
//   nll = log S - beta d_y,  dnll/dbeta = A/S - d_y,  d2nll/dbeta2 = B/S - (A/S)^2
//
// Grid: (n rows, ceil(k / kFitTempsPerBlock)). A block reads its row twice (max/validity,
// then the sums for its 8 temperatures, kept per thread in 24 registers, fully unrolled so
// nothing lands in local memory), reduces them over the block with warp shuffles and a
// small shared array, and thread j < 8 writes temperature j's three outputs. Rows are
// re-read once per 8 temperatures from L2; the stream of batches is still read once.
// exp is __expf (ex2.approx): its ~2 ulp error is far below the fp32 sums' rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "temperature_fit.h"

namespace mllmcal_cuda {
namespace {

constexpr int kT = kFitTempsPerBlock;
constexpr int kWarps = kFitThreads / 32;
constexpr float kLiveFloor = -87.0f;  // exp below this is 0 in fp32: the term is dropped

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kFitThreads, 4)
    temperature_fit_kernel(const T* __restrict__ x, int64_t v, int64_t stride_x,
                           const int64_t* __restrict__ labels, int64_t ignore_index,
                           const float* __restrict__ betas, int64_t k, float* __restrict__ out,
                           uint8_t* __restrict__ status) {
  __shared__ float red[kWarps][3 * kT];
  __shared__ float red_m[kWarps];
  __shared__ int red_bad[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kT;
  const T* xr = x + row * stride_x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // Pass 1: max and validity (NaN or +inf makes the row invalid).
  float m = -INFINITY;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < v; i += kFitThreads) {
    const float xv = to_float(xr[i]);
    bad |= (xv != xv) | (xv == INFINITY);
    m = fmaxf(m, xv);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
  }
  if (lane == 0) {
    red_m[warp] = m;
    red_bad[warp] = bad;
  }
  __syncthreads();
  m = red_m[0];
  bad = red_bad[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    m = fmaxf(m, red_m[w]);
    bad |= red_bad[w];
  }
  const int64_t y = labels[row];
  const bool valid = !bad && m > -INFINITY && y != ignore_index;
  const float dy = valid ? to_float(xr[y]) - m : 0.0f;
  const bool used = valid && dy > -INFINITY;

  float beta[kT], s[kT], a[kT], b[kT];
#pragma unroll
  for (int j = 0; j < kT; ++j) {
    beta[j] = k0 + j < k ? betas[k0 + j] : 1.0f;
    s[j] = a[j] = b[j] = 0.0f;
  }
  // Pass 2 (skipped by unused rows: the block's branch is uniform).
  if (used) {
    for (int64_t i = threadIdx.x; i < v; i += kFitThreads) {
      const float d = to_float(xr[i]) - m;
#pragma unroll
      for (int j = 0; j < kT; ++j) {
        const float t = beta[j] * d;
        const bool live = t >= kLiveFloor;  // false for d = -inf (masked entries)
        const float e = live ? __expf(t) : 0.0f;
        const float ed = live ? e * d : 0.0f;
        s[j] += e;
        a[j] += ed;
        b[j] += live ? ed * d : 0.0f;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kT; ++j) {
    s[j] = warp_sum(s[j]);
    a[j] = warp_sum(a[j]);
    b[j] = warp_sum(b[j]);
  }
  __syncthreads();  // red_m is reused below only through `red`, but keep phases apart
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kT; ++j) {
      red[warp][j] = s[j];
      red[warp][kT + j] = a[j];
      red[warp][2 * kT + j] = b[j];
    }
  }
  __syncthreads();
  const int j = threadIdx.x;
  if (j < kT && k0 + j < k) {
    float S = 0.0f, A = 0.0f, B = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      S += red[w][j];
      A += red[w][kT + j];
      B += red[w][2 * kT + j];
    }
    float* o = out + row * 3 * k + k0 + j;
    if (used) {
      const float mean = A / S;
      o[0] = logf(S) - betas[k0 + j] * dy;
      o[k] = mean - dy;
      o[2 * k] = fmaxf(B / S - mean * mean, 0.0f);
    } else {
      o[0] = o[k] = o[2 * k] = 0.0f;
    }
  }
  if (threadIdx.x == 0 && blockIdx.y == 0) status[row] = used ? 1 : (valid ? 2 : 0);
}

template <typename T>
cudaError_t launch(const TemperatureFitArgs& a) {
  const dim3 grid(static_cast<unsigned int>(a.n),
                  static_cast<unsigned int>((a.k + kT - 1) / kT));
  temperature_fit_kernel<T><<<grid, kFitThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.x), a.v, a.stride_x, a.labels, a.ignore_index, a.betas, a.k,
      a.out, a.status);
  return cudaGetLastError();
}

}  // namespace

const char* temperature_fit(const TemperatureFitArgs& a) {
  if (a.dtype < 0 || a.dtype > 2) return "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)";
  if (a.n < 0 || a.v < 1 || a.k < 1) return "need n >= 0, v >= 1, k >= 1";
  if (a.n == 0) return nullptr;
  if (a.n > 2147483647LL || (a.k + kT - 1) / kT > 65535) return "too many rows or temperatures";
  cudaError_t err = a.dtype == 0   ? launch<float>(a)
                    : a.dtype == 1 ? launch<__half>(a)
                                   : launch<__nv_bfloat16>(a);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mllmcal_cuda
