// pybind11 module mllmcal._C_cuda: the CUDA kernels over raw device pointers. Argument
// names and order are shared with mllmcal._C (csrc/common/bindings.h); this file adds
// the CUDA launch tail: the split path's workspace and splits, and the stream as the
// integer torch.cuda.current_stream().cuda_stream. Compiled by the host C++ compiler; it
// includes no torch and no CUDA headers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bindings.h"
#include "cuda/temperature_fit.h"
#include "cuda/token_stats.h"

namespace py = pybind11;

namespace {

void launch_token_stats(mllmcal_cuda::TokenStatsArgs& a, std::uintptr_t workspace, int splits,
                        std::uintptr_t stream) {
  a.workspace = reinterpret_cast<void*>(workspace);
  a.splits = splits;
  a.stream = reinterpret_cast<void*>(stream);
  if (const char* err = mllmcal_cuda::token_stats(a))
    throw std::runtime_error(std::string("mllmcal CUDA kernel: ") + err);
}

void launch_temperature_fit(mllmcal_cuda::TemperatureFitArgs& a, std::uintptr_t stream) {
  a.stream = reinterpret_cast<void*>(stream);
  if (const char* err = mllmcal_cuda::temperature_fit(a))
    throw std::runtime_error(std::string("mllmcal CUDA temperature_fit: ") + err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "mllmcal CUDA kernels over raw device pointers (see mllmcal/_backends/compiled.py).";
  m.attr("THREADS") = mllmcal_cuda::kThreads;
  m.attr("MAX_SPLITS") = mllmcal_cuda::kMaxSplits;
  m.def("workspace_bytes", &mllmcal_cuda::workspace_bytes, py::arg("n"), py::arg("splits"),
        "Bytes of zero-initialised workspace the split-vocabulary path needs.");
  mllmcal_bindings::def_token_stats(
      m, &launch_token_stats,
      "Launch the fused token-statistics kernel on `stream` (see mllmcal/_contract.py).",
      py::arg("workspace"), py::arg("splits"), py::arg("stream"));
  mllmcal_bindings::def_temperature_fit(
      m, &launch_temperature_fit,
      "Launch the one-pass temperature-fit kernel on `stream`: out fp32 [n, 3, k] (nll,\n"
      "dnll/dbeta, d2nll/dbeta2), status uint8 [n] (0 skipped, 1 used, 2 label masked).",
      py::arg("stream"));
}
