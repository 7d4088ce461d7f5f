// Fused per-row token statistics on the GPU: one read of the logits, online softmax.
//
// Semantics: mllmcal/_contract.py (the float64 oracle is mllmcal/reference.py). For each
// row of z = x / T (fp32, the division correctly rounded) the kernel carries the
// online-softmax state (m, S, A, B, Q) relative to the running maximum m, the lowest index
// attaining m and the label's z_y; the state, its rescaling and the statistics it gives
// are written out once, in mllmcal/kernels/token_stats.py ("maths").
//
// Two launch shapes share one kernel (the caller chooses, in mllmcal/_backends/launch.py):
//   path A (splits == 1): one block per row; enough rows fill the GPU on their own.
//   path B (splits  > 1): the row's vocabulary is cut into `splits` segments, one block
//     each, so that a batch of 1..8 rows still puts a block on every SM. Each block writes
//     its partial state to the workspace; the last block of a row to arrive (an atomic
//     counter per row) merges the partials in split order and writes the row's results.
//     Merging in a fixed order keeps the result deterministic, and there is no second
//     launch, which matters at ~2-4 µs of launch latency against a ~0.1 µs read.
//
// Loads are 16-byte vectors (4 fp32 or 8 fp16/bf16) through a scalar prologue up to the
// first 16-byte boundary and a scalar epilogue for the remainder; per thread, elements
// are visited in increasing index order, which is what makes a strict `>` pick the lowest
// index on ties. Offsets are int64: N·V may exceed 2^31.
//
// Built WITHOUT --use_fast_math (see setup.py): the contract needs IEEE division for
// z = x / T, NaN checks that the compiler may not fold away, and correctly rounded
// 1 / S and log S. The one approximate function is ex2.approx.ftz in the hot loop,
// written out explicitly; it is exact at 0 (the maximum's term is exactly 1) and
// flushes to 0 below 2^-126, which the guards below rely on.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "token_stats.h"

namespace mllmcal_cuda {
namespace {

// Row indices of the [7, N] fstats buffer (mllmcal/_contract.py).
constexpr int kLSE = 0, kCONF = 1, kENT = 2, kLABEL_LOGPROB = 3, kBRIER = 4, kMEAN = 5, kVAR = 6;
constexpr uint8_t kFlagValid = 1, kFlagCorrect = 2;
constexpr float kLog2e = 1.4426950408889634f;
// Vectors each thread has in flight before it starts computing: enough bytes in flight
// per SM to cover DRAM latency without pushing registers past the 64 of 4 blocks/SM.
constexpr int kUnroll = 2;
// Segment boundaries of the split path are multiples of this many elements, so that
// every segment of a 16-byte-aligned row starts 16-byte aligned (no scalar prologue).
constexpr int kSplitAlign = 8;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// 2^x with ftz: exact for x == 0, 0 for x == -inf or below -126, NaN for NaN.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

struct State {
  float m;    // running max of z (never NaN: fmaxf drops NaNs; NaN rows poison s instead)
  int idx;    // lowest index attaining m (INT_MAX while empty)
  float s, a, b, q;  // S, A, B, Q relative to m (see the header comment)
  float zy;   // z at the label's index, NaN until the thread that owns it sees it
};

__device__ __forceinline__ State empty_state() {
  return State{neg_inf(), INT_MAX, 0.f, 0.f, 0.f, 0.f, quiet_nan()};
}

// Re-express the sums relative to a new maximum m_new >= st.m, with d = m - m_new <= 0
// (the rescaling in mllmcal/kernels/token_stats.py's maths). When e^d underflows (d < ~-87, or d = -inf for an empty state, or NaN from inf - inf)
// the old terms are negligible, and computing d² S would overflow to inf * 0 = NaN, so
// they are dropped -- except that S * 0 keeps a NaN: a row that has seen a NaN stays
// poisoned (its validity is decided by isnan(S) at the end).
__device__ __forceinline__ void shift(State& st, float m_new) {
  const float d = st.m - m_new;
  const float f = ex2(d * kLog2e);
  if (f > 0.f) {
    st.b = f * fmaf(d, fmaf(d, st.s, 2.f * st.a), st.b);
    st.a = f * fmaf(d, st.s, st.a);
    st.s *= f;
    st.q *= f * f;
  } else {
    st.s *= 0.f;
    st.a = 0.f;
    st.b = 0.f;
    st.q = 0.f;
  }
}

// Merge two states: shift both to M = max(m1, m2) and add. The argmax keeps the lower
// index on equal maxima (each side already holds its own lowest index). z_y is owned by
// exactly one element, so at most one side has it (or both NaN).
__device__ __forceinline__ State merge(State x, State y) {
  const float m = fmaxf(x.m, y.m);
  const bool take_y = y.m > x.m || (y.m == x.m && y.idx < x.idx);
  const int idx = take_y ? y.idx : x.idx;
  shift(x, m);
  shift(y, m);
  State r;
  r.m = m;
  r.idx = idx;
  r.s = x.s + y.s;
  r.a = x.a + y.a;
  r.b = x.b + y.b;
  r.q = x.q + y.q;
  r.zy = isnan(x.zy) ? y.zy : x.zy;
  return r;
}

// Fold K consecutive elements z[0..K) (indices j0..j0+K) into a thread's state. The
// chunk max is taken first, so the state is rescaled at most once per chunk, and only
// when the maximum grows (rare after the first few chunks of a row).
template <int K>
__device__ __forceinline__ void accumulate(State& st, const float (&z)[K], int j0) {
  float cm = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cm = fmaxf(cm, z[k]);
  if (cm > st.m) {
    int idx = j0;
#pragma unroll
    for (int k = K - 1; k >= 0; --k) idx = (z[k] == cm) ? j0 + k : idx;  // lowest k wins
    shift(st, cm);
    st.m = cm;
    st.idx = idx;
  }
  // While every element so far is -inf, use 0 as the reference so that d = -inf, not NaN.
  const float ms = st.m == neg_inf() ? 0.f : st.m;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = z[k] - ms;
    const float e = ex2(d * kLog2e);  // NaN input -> NaN -> poisons S, as it should
    // Terms with e == 0 (masked -inf, or d < ~-87) must add exactly 0 to A and B:
    // clamping d keeps 0 * (-inf) and 0 * (huge)^2 = NaN out. Terms with e > 0 have
    // d > -88 and are untouched by the clamp.
    const float dc = fmaxf(d, -126.f);
    const float t = e * dc;
    st.s += e;
    st.a += t;
    st.b = fmaf(t, dc, st.b);
    st.q = fmaf(e, e, st.q);
  }
}

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ static float load1(const float* p) { return *p; }
  __device__ static void store1(float* p, float z) { *p = z; }
  __device__ static void unpack(const uint4& u, float (&z)[4]) {
    z[0] = __uint_as_float(u.x);
    z[1] = __uint_as_float(u.y);
    z[2] = __uint_as_float(u.z);
    z[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float (&z)[4]) {
    return make_uint4(__float_as_uint(z[0]), __float_as_uint(z[1]), __float_as_uint(z[2]),
                      __float_as_uint(z[3]));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void store1(__nv_bfloat16* p, float z) { *p = __float2bfloat16_rn(z); }
  // bf16 is the top half of an fp32: widening is a shift or a mask, no conversion op.
  __device__ static void unpack(const uint4& u, float (&z)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      z[2 * i] = __uint_as_float(w[i] << 16);
      z[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float (&z)[8]) {
    return make_uint4(pack2(z[0], z[1]), pack2(z[2], z[3]), pack2(z[4], z[5]), pack2(z[6], z[7]));
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ static float load1(const __half* p) { return __half2float(*p); }
  __device__ static void store1(__half* p, float z) { *p = __float2half_rn(z); }
  __device__ static void unpack(const uint4& u, float (&z)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      z[2 * i] = f.x;
      z[2 * i + 1] = f.y;
    }
  }
  __device__ static uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float (&z)[8]) {
    return make_uint4(pack2(z[0], z[1]), pack2(z[2], z[3]), pack2(z[4], z[5]), pack2(z[6], z[7]));
  }
};

__device__ __forceinline__ State shfl_down(const State& s, int off) {
  State r;
  r.m = __shfl_down_sync(0xffffffffu, s.m, off);
  r.idx = __shfl_down_sync(0xffffffffu, s.idx, off);
  r.s = __shfl_down_sync(0xffffffffu, s.s, off);
  r.a = __shfl_down_sync(0xffffffffu, s.a, off);
  r.b = __shfl_down_sync(0xffffffffu, s.b, off);
  r.q = __shfl_down_sync(0xffffffffu, s.q, off);
  r.zy = __shfl_down_sync(0xffffffffu, s.zy, off);
  return r;
}

__device__ __forceinline__ State warp_reduce(State s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s = merge(s, shfl_down(s, off));
  return s;
}

// Tree reduction over the block in a fixed order (so results are deterministic); the
// result is valid in thread 0. Callers separate two uses by a __syncthreads.
__device__ __forceinline__ State block_reduce(State s) {
  __shared__ State warp_states[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s = warp_reduce(s);
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kThreads / 32 ? warp_states[lane] : empty_state();
    s = warp_reduce(s);
  }
  return s;
}

// The launch arguments and what the host derives from them.
struct Params : TokenStatsArgs {
  unsigned int* counters;  // [n]
  float4* partials;        // [n, splits, 2]
  int64_t chunk;           // elements per split segment (a multiple of kSplitAlign)
  bool vec_ok;             // x and out rows share their 16-byte phase (or no out)
};

// Turn a row's final state into the contract's outputs (one thread per row).
__device__ void finalize(const State& st, int64_t row, const Params& p) {
  const int64_t n = p.n;
  float* f = p.fstats;
  const int64_t y = p.labels ? p.labels[row] : p.ignore_index;
  const bool labelled = p.labels != nullptr && y != p.ignore_index;
  // A finite max means no +inf and not all -inf; NaN anywhere has poisoned S.
  const bool valid = isfinite(st.m) && !isnan(st.s);
  if (!valid) {
    const float nan = quiet_nan();
#pragma unroll
    for (int k = 0; k < 7; ++k) f[k * n + row] = nan;
    p.pred[row] = -1;
    p.flags[row] = 0;
    return;
  }
  // S >= 1 here: the maximum's own term is e^0 = 1 exactly.
  const float inv_s = 1.f / st.s;
  const float log_s = logf(st.s);
  const float mean_d = st.a * inv_s;  // E_p[z - m]
  f[kLSE * n + row] = st.m + log_s;
  f[kCONF * n + row] = inv_s;
  f[kENT * n + row] = fmaxf(log_s - mean_d, 0.f);
  f[kMEAN * n + row] = st.m + mean_d;
  f[kVAR * n + row] = fmaxf(fmaf(-mean_d, mean_d, st.b * inv_s), 0.f);
  p.pred[row] = st.idx;
  const bool correct = labelled && st.idx == y;
  if (labelled) {
    // Relative to the max, never z_y - logsumexp: with |z| ~ 1e30, m + log S absorbs log S.
    const float lp = (st.zy - st.m) - log_s;
    f[kLABEL_LOGPROB * n + row] = lp;
    f[kBRIER * n + row] = st.q * inv_s * inv_s - 2.f * expf(lp) + 1.f;
  } else {
    f[kLABEL_LOGPROB * n + row] = quiet_nan();
    f[kBRIER * n + row] = quiet_nan();
  }
  p.flags[row] = kFlagValid | (correct ? kFlagCorrect : 0);
  if (p.hist != nullptr && labelled) {
    // Integer adds commute: the histogram does not depend on the order rows finish.
    const int nb = p.n_bins;
    int b = static_cast<int>(floorf(__fmul_rn(inv_s, static_cast<float>(nb))));
    b = min(max(b, 0), nb - 1);
    auto* h = reinterpret_cast<unsigned long long*>(p.hist);
    atomicAdd(h + b, 1ull);
    // conf * 2^32 is exact in double; rint (half to even) as _contract.conf_fixed_point.
    atomicAdd(h + nb + b, static_cast<unsigned long long>(
                              __double2ll_rn(static_cast<double>(inv_s) * 4294967296.0)));
    if (correct) atomicAdd(h + 2 * nb + b, 1ull);
  }
}

template <typename T, bool kScale, bool kWrite>
__global__ void __launch_bounds__(kThreads, 4) token_stats_kernel(const Params p) {
  using E = Elem<T>;
  constexpr int V = E::kVec;
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x / p.splits;
  const int split = static_cast<int>(blockIdx.x - row * p.splits);
  const int64_t s0 = static_cast<int64_t>(split) * p.chunk;
  const int len = static_cast<int>(max(int64_t{0}, min(p.v, s0 + p.chunk) - s0));
  const T* xs = static_cast<const T*>(p.x) + row * p.stride_x + s0;
  T* os = kWrite ? static_cast<T*>(p.scaled_out) + row * p.stride_out + s0 : nullptr;
  const float t = kScale ? (p.temperature_rows ? p.temperature_rows[row] : p.temperature) : 1.f;
  // The label's index relative to this segment; an ignored label never matches.
  const int64_t y_local = (p.labels ? p.labels[row] : p.ignore_index) - s0;

  // Scalar prologue up to the first 16-byte boundary (the whole segment when x and out
  // cannot both be vector-accessed), 16-byte body, scalar epilogue.
  int head = len;
  if (p.vec_ok) {
    const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(xs) & 15u);
    head = min(len, ((16 - mis) & 15) / static_cast<int>(sizeof(T)));
  }
  const int nvec = (len - head) / V;
  const int tail = head + nvec * V;

  State st = empty_state();
  auto scalar = [&](int j) {
    float z[1] = {E::load1(xs + j)};
    if (kScale) z[0] = __fdiv_rn(z[0], t);
    if (kWrite) E::store1(os + j, z[0]);
    if (j == y_local) st.zy = z[0];
    accumulate<1>(st, z, static_cast<int>(s0) + j);
  };
  auto vector = [&](const uint4& u, int k) {
    const int j = head + k * V;
    float z[V];
    E::unpack(u, z);
    if (kScale) {
#pragma unroll
      for (int i = 0; i < V; ++i) z[i] = __fdiv_rn(z[i], t);
    }
    if (kWrite) reinterpret_cast<uint4*>(os + head)[k] = E::pack(z);
    if (static_cast<uint64_t>(y_local - j) < static_cast<uint64_t>(V)) {
#pragma unroll
      for (int i = 0; i < V; ++i) st.zy = (j + i == y_local) ? z[i] : st.zy;
    }
    accumulate<V>(st, z, static_cast<int>(s0) + j);
  };

  for (int j = tid; j < head; j += kThreads) scalar(j);
  const uint4* xv = reinterpret_cast<const uint4*>(xs + head);
  int k = tid;
  // Issue all kUnroll loads before using any, so each thread keeps 16·kUnroll bytes in
  // flight. __ldcs: the logits are streamed once; evict-first keeps L2 for the rest.
  for (; k + (kUnroll - 1) * kThreads < nvec; k += kUnroll * kThreads) {
    uint4 u[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) u[r] = __ldcs(xv + k + r * kThreads);
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) vector(u[r], k + r * kThreads);
  }
  for (; k < nvec; k += kThreads) vector(__ldcs(xv + k), k);
  for (int j = tail + tid; j < len; j += kThreads) scalar(j);

  st = block_reduce(st);

  if (p.splits == 1) {
    if (tid == 0) finalize(st, row, p);
    return;
  }
  // Path B: publish this segment's partial, then let the row's last block merge.
  __shared__ bool is_last;
  if (tid == 0) {
    float4* part = p.partials + (row * p.splits + split) * 2;
    part[0] = make_float4(st.m, st.s, st.a, st.b);
    part[1] = make_float4(st.q, st.zy, __int_as_float(st.idx), 0.f);
    __threadfence();  // the partial is visible device-wide before the count says so
    const unsigned int arrived = atomicAdd(p.counters + row, 1u);
    is_last = arrived == static_cast<unsigned int>(p.splits - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  State part = empty_state();
  if (tid < p.splits) {
    // __ldcg: read from L2, never from a stale L1 line.
    const float4* src = p.partials + (row * p.splits + tid) * 2;
    const float4 a = __ldcg(src), b = __ldcg(src + 1);
    part = State{a.x, __float_as_int(b.z), a.y, a.z, a.w, b.x, b.y};
  }
  part = block_reduce(part);
  if (tid == 0) {
    p.counters[row] = 0;  // ready for the next launch on this workspace
    finalize(part, row, p);
  }
}

template <typename T, bool kScale, bool kWrite>
cudaError_t launch(const Params& p, int64_t blocks, cudaStream_t stream) {
  token_stats_kernel<T, kScale, kWrite>
      <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const Params& p, bool scale, bool write, int64_t blocks, cudaStream_t s) {
  if (scale) return write ? launch<T, true, true>(p, blocks, s) : launch<T, true, false>(p, blocks, s);
  return write ? launch<T, false, true>(p, blocks, s) : launch<T, false, false>(p, blocks, s);
}

size_t counters_bytes(int64_t n) { return static_cast<size_t>((n * 4 + 31) / 32 * 32); }

}  // namespace

size_t workspace_bytes(int64_t n, int splits) {
  if (splits <= 1 || n <= 0) return 0;
  return counters_bytes(n) + static_cast<size_t>(n) * splits * 2 * sizeof(float4);
}

const char* token_stats(const TokenStatsArgs& a) {
  if (a.n < 0 || a.v < 1) return "token_stats: need n >= 0 and v >= 1";
  if (a.n == 0) return nullptr;
  if (a.v > INT_MAX) return "token_stats: the CUDA kernel needs v < 2^31";
  if (a.splits < 1 || a.splits > kMaxSplits) return "token_stats: splits must be in [1, 256]";
  if (a.stride_x < a.v) return "token_stats: row stride of x is smaller than v";
  const int64_t blocks = a.n * a.splits;
  if (blocks > INT_MAX) return "token_stats: n * splits exceeds the grid limit (2^31 - 1)";
  if (a.splits > 1 && a.workspace == nullptr) return "token_stats: the split path needs a workspace";
  if (a.hist != nullptr && a.n_bins < 1) return "token_stats: n_bins must be >= 1";
  size_t item;
  switch (a.dtype) {
    case kFloat32: item = 4; break;
    case kFloat16:
    case kBFloat16: item = 2; break;
    default: return "token_stats: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)";
  }
  Params p{};
  static_cast<TokenStatsArgs&>(p) = a;
  // Segment length: v / splits rounded up to kSplitAlign, so segments keep the row's
  // 16-byte phase; trailing segments may be short or empty (they publish empty states).
  const int64_t per = (a.v + a.splits - 1) / a.splits;
  p.chunk = (per + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  if (a.splits > 1) {
    auto* ws = static_cast<unsigned char*>(a.workspace);
    p.counters = reinterpret_cast<unsigned int*>(ws);
    p.partials = reinterpret_cast<float4*>(ws + counters_bytes(a.n));
  }
  // Vector stores go through the same 16-byte phase as the loads, so out must share it:
  // true for in-place writes and for contiguous outputs of contiguous inputs.
  p.vec_ok = true;
  if (a.scaled_out != nullptr) {
    const int64_t delta = static_cast<int64_t>(reinterpret_cast<uintptr_t>(a.scaled_out)) -
                          static_cast<int64_t>(reinterpret_cast<uintptr_t>(a.x));
    const int64_t dstride = (a.stride_out - a.stride_x) * static_cast<int64_t>(item);
    p.vec_ok = (delta % 16 == 0) && (dstride % 16 == 0);
  }
  const bool scale = a.temperature_rows != nullptr || a.temperature != 1.0f;
  const bool write = a.scaled_out != nullptr;
  auto stream = static_cast<cudaStream_t>(a.stream);
  cudaError_t err;
  switch (a.dtype) {
    case kFloat32: err = dispatch<float>(p, scale, write, blocks, stream); break;
    case kFloat16: err = dispatch<__half>(p, scale, write, blocks, stream); break;
    default: err = dispatch<__nv_bfloat16>(p, scale, write, blocks, stream); break;
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mllmcal_cuda
