// pybind11 module mllmcal._C_cuda: checks nothing torch-specific, forwards raw pointers.
//
// Compiled by the host C++ compiler; it includes no torch and no CUDA headers. Pointers
// arrive as Python ints (tensor.data_ptr(), 0 for "absent"), the stream as the integer
// torch.cuda.current_stream().cuda_stream. Validation of shapes and values happens in
// mllmcal/ops.py; the launcher checks only what would otherwise crash the device.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/token_stats.h"

namespace mllmcal_cuda { void register_temperature_fit(pybind11::module_& m); }  // temperature_fit_bindings.cpp

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void token_stats(std::uintptr_t x, int dtype, int64_t n, int64_t v, int64_t stride_x,
                 std::uintptr_t labels, int64_t ignore_index, double temperature,
                 std::uintptr_t temperature_rows, std::uintptr_t fstats, std::uintptr_t pred,
                 std::uintptr_t flags, std::uintptr_t scaled_out, int64_t stride_out,
                 std::uintptr_t hist, int n_bins, std::uintptr_t workspace, int splits,
                 std::uintptr_t stream) {
  if (x == 0 || fstats == 0 || pred == 0 || flags == 0)
    throw std::invalid_argument("token_stats: x, fstats, pred and flags must be non-null");
  mllmcal_cuda::TokenStatsArgs a{};
  a.x = ptr<const void>(x);
  a.dtype = dtype;
  a.n = n;
  a.v = v;
  a.stride_x = stride_x;
  a.labels = ptr<const int64_t>(labels);
  a.ignore_index = ignore_index;
  a.temperature = static_cast<float>(temperature);
  a.temperature_rows = ptr<const float>(temperature_rows);
  a.fstats = ptr<float>(fstats);
  a.pred = ptr<int64_t>(pred);
  a.flags = ptr<uint8_t>(flags);
  a.scaled_out = ptr<void>(scaled_out);
  a.stride_out = stride_out;
  a.hist = ptr<int64_t>(hist);
  a.n_bins = n_bins;
  a.workspace = ptr<void>(workspace);
  a.splits = splits;
  a.stream = ptr<void>(stream);
  if (const char* err = mllmcal_cuda::token_stats(a))
    throw std::runtime_error(std::string("mllmcal CUDA kernel: ") + err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "mllmcal CUDA kernels over raw device pointers (see mllmcal/_cuda.py).";
  m.attr("THREADS") = mllmcal_cuda::kThreads;
  m.attr("MAX_SPLITS") = mllmcal_cuda::kMaxSplits;
  m.def("workspace_bytes", &mllmcal_cuda::workspace_bytes, py::arg("n"), py::arg("splits"),
        "Bytes of zero-initialised workspace the split-vocabulary path needs.");
  m.def("token_stats", &token_stats, py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("v"),
        py::arg("stride_x"), py::arg("labels"), py::arg("ignore_index"), py::arg("temperature"),
        py::arg("temperature_rows"), py::arg("fstats"), py::arg("pred"), py::arg("flags"),
        py::arg("scaled_out"), py::arg("stride_out"), py::arg("hist"), py::arg("n_bins"),
        py::arg("workspace"), py::arg("splits"), py::arg("stream"),
        "Launch the fused token-statistics kernel on `stream` (see mllmcal/_contract.py).");
  mllmcal_cuda::register_temperature_fit(m);
}
