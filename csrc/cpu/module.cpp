// pybind11 module mllmcal._C: the CPU kernels over raw pointers, nothing returned; the GIL
// is released while a kernel runs. Argument names and order are shared with
// mllmcal._C_cuda (csrc/common/bindings.h); this file adds the CPU's launch tail.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bindings.h"
#include "cpu/gemm_bf16.h"
#include "cpu/split_pool.h"
#include "cpu/temperature_fit.h"
#include "cpu/token_stats.h"

namespace py = pybind11;

namespace {

void launch_token_stats(mllmcal::Args& a, int num_threads, int mode, int64_t chunk_columns,
                        const std::string& isa) {
  if (mode < mllmcal::kModeAuto || mode > mllmcal::kModeSplit)
    throw std::invalid_argument("mode must be 0 (auto), 1 (rows) or 2 (split)");
  a.kernels = mllmcal::select_kernels(isa.c_str());
  if (a.kernels == nullptr)
    throw std::invalid_argument("kernel ISA '" + isa + "' is unknown or not supported by this CPU");
  a.num_threads = num_threads;
  a.mode = mode;
  a.chunk_columns = chunk_columns;
  py::gil_scoped_release release;
  mllmcal::token_stats(a);
}

void launch_temperature_fit(mllmcal::FitArgs& a, int num_threads) {
  // The fit kernel converts each row into a thread-local buffer it also writes through:
  // rows must not overlap.
  if (a.n > 1 && a.stride_x < a.v)
    throw std::invalid_argument("stride_x must be >= v (rows may not overlap)");
  a.num_threads = num_threads;
  py::gil_scoped_release release;
  mllmcal::temperature_fit(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mllmcal C++ CPU kernels (torch-free; raw pointers, OpenMP)";
  mllmcal_bindings::def_token_stats(
      m, &launch_token_stats,
      "Fused per-row token statistics of an [n, v] logits buffer; see mllmcal/_contract.py.\n"
      "labels, temperature_rows, scaled_out and hist may be 0 (absent). mode: 0 auto, 1 one\n"
      "chunk per row, 2 split rows into vocabulary chunks (chunk_columns wide, or automatic\n"
      "when <= 0). num_threads <= 0 uses the OpenMP default. isa: '' (best), 'generic',\n"
      "'avx2', 'avx512'.",
      py::arg("num_threads") = 0, py::arg("mode") = 0, py::arg("chunk_columns") = 0,
      py::arg("isa") = "");
  mllmcal_bindings::def_temperature_fit(
      m, &launch_temperature_fit,
      "Per-row NLL and its first two derivatives in beta = 1/T at k temperatures, one read\n"
      "of each [n, v] logits row (see csrc/cpu/temperature_fit.h). out: fp32 [n, 3, k];\n"
      "status: uint8 [n] (0 skipped, 1 used, 2 label masked).",
      py::arg("num_threads") = 0);
  m.def("gemm_bf16_supported", &mllmcal::gemm_bf16_supported,
        "Whether this CPU runs gemm_bf16_nt (AVX512-BF16).");
  m.def(
      "gemm_bf16_nt",
      [](std::uintptr_t a, int64_t lda, std::uintptr_t b, int64_t ldb, std::uintptr_t c,
         int64_t ldc, int64_t m, int64_t n, int64_t k, std::uintptr_t bias, int num_threads) {
        if (!mllmcal::gemm_bf16_supported())
          throw std::invalid_argument("gemm_bf16_nt needs a CPU with AVX512-BF16");
        if (m < 0 || n < 0 || k < 0 || lda < k || ldb < k || ldc < n)
          throw std::invalid_argument("gemm_bf16_nt: need m, n, k >= 0, lda >= k, ldb >= k, ldc >= n");
        py::gil_scoped_release release;
        mllmcal::gemm_bf16_nt(reinterpret_cast<const uint16_t*>(a), lda,
                              reinterpret_cast<const uint16_t*>(b), ldb,
                              reinterpret_cast<float*>(c), ldc, m, n, k,
                              reinterpret_cast<const float*>(bias), num_threads);
      },
      py::arg("a"), py::arg("lda"), py::arg("b"), py::arg("ldb"), py::arg("c"), py::arg("ldc"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bias") = 0, py::arg("num_threads") = 0,
      "C [m, n] fp32 (row stride ldc) = A [m, k] bf16 (row stride lda) @ B [n, k] bf16 (row\n"
      "stride ldb)^T (+ bias fp32 [n]; 0: none), products exact, sums in fp32 (see\n"
      "csrc/cpu/gemm_bf16.h). Pointers as ints; num_threads <= 0: OpenMP's default.");
  m.def("pool_policy", &mllmcal::split_pool_policy, py::arg("policy") = "",
        "Wake policy of the kernel's thread pool for every later call: 'auto' (default: wake\n"
        "the helpers only when the work left is worth the measured cost of waking them),\n"
        "'always' or 'never'. Returns the policy before the call; '' only reads it. Results\n"
        "do not depend on it (see csrc/cpu/split_pool.h).");
  m.def(
      "pool_stats",
      [](bool reset, double wake_cost_us) {
        const mllmcal::SplitPoolStats s = mllmcal::split_pool_stats(reset, wake_cost_us);
        py::dict d;
        d["calls"] = s.calls;
        d["woken"] = s.woken;
        d["helper_items"] = s.helper_items;
        d["wake_cost_us"] = s.wake_cost_us;
        d["ns_per_element"] = s.ns_per_element;
        return d;
      },
      py::arg("reset") = false, py::arg("wake_cost_us") = -1.0,
      "The pool's counters (multi-threaded calls, calls that woke the helpers, items the\n"
      "helpers ran) and estimates (wake cost in µs, the caller's ns per element; -1 when\n"
      "unknown), as they were before the call. Then reset zeroes and forgets them, and\n"
      "wake_cost_us >= 0 pins the wake-cost estimate (tests).");
  m.def(
      "kernel_isa", [] { return std::string(mllmcal::select_kernels(nullptr)->isa); },
      "Name of the instruction set the kernel runs with on this CPU.");
  m.def(
      "supported_isas",
      [] {
        py::list out;
        for (const char* name : {"generic", "avx2", "avx512"})
          if (mllmcal::select_kernels(name) != nullptr) out.append(name);
        return out;
      },
      "Kernel instruction sets this CPU can run.");
}
