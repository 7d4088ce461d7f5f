// pybind11 binding of mllmcal._C: raw pointers (Python ints) in, nothing returned; the
// GIL is released while the kernel runs. Only cheap structural checks live here (a bad
// pointer cannot be checked); value checks (label range, temperatures) are done by
// mllmcal.ops before the call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/token_stats.h"

namespace mllmcal { void register_temperature_fit(pybind11::module_& m); }  // temperature_fit_bindings.cpp

namespace py = pybind11;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void token_stats_py(uintptr_t x, int64_t n, int64_t v, int64_t x_row_stride, int dtype,
                    uintptr_t labels, double temperature, uintptr_t temperature_rows,
                    uintptr_t fstats, uintptr_t pred, uintptr_t flags, uintptr_t scaled_out,
                    int64_t out_row_stride, uintptr_t hist, int64_t n_bins, int64_t ignore_index,
                    int num_threads, int mode, int64_t chunk_columns, const std::string& isa) {
  if (dtype < mllmcal::kF32 || dtype > mllmcal::kBF16)
    throw std::invalid_argument("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                std::to_string(dtype));
  if (n < 0 || v < 1) throw std::invalid_argument("need n >= 0 and v >= 1");
  if (n > 0 && (x == 0 || fstats == 0 || pred == 0 || flags == 0))
    throw std::invalid_argument("x, fstats, pred and flags must be non-null");
  // Rows are only read, so they may overlap or repeat: stride 0 (expand) and stride < v
  // (unfold) are legal, as DESIGN promises "any strides along rows".
  if (n > 1 && x_row_stride < 0) throw std::invalid_argument("x_row_stride must be >= 0");
  if (scaled_out != 0 && n > 1 && out_row_stride < v)
    throw std::invalid_argument("out_row_stride must be >= v (written rows may not overlap)");
  if (hist != 0 && n_bins < 1) throw std::invalid_argument("n_bins must be >= 1 with a histogram");
  if (mode < mllmcal::kModeAuto || mode > mllmcal::kModeSplit)
    throw std::invalid_argument("mode must be 0 (auto), 1 (rows) or 2 (split)");
  if (!(temperature > 0.0)) throw std::invalid_argument("temperature must be > 0");
  const mllmcal::KernelTable* kernels = mllmcal::select_kernels(isa.c_str());
  if (kernels == nullptr)
    throw std::invalid_argument("kernel ISA '" + isa + "' is unknown or not supported by this CPU");

  mllmcal::Args a;
  a.x = ptr<const void>(x);
  a.n = n;
  a.v = v;
  a.x_row_stride = x_row_stride;
  a.dtype = dtype;
  a.labels = ptr<const int64_t>(labels);
  a.temperature = static_cast<float>(temperature);
  a.temperature_rows = ptr<const float>(temperature_rows);
  a.fstats = ptr<float>(fstats);
  a.pred = ptr<int64_t>(pred);
  a.flags = ptr<uint8_t>(flags);
  a.out = ptr<void>(scaled_out);
  a.out_row_stride = out_row_stride;
  a.hist = ptr<int64_t>(hist);
  a.n_bins = n_bins;
  a.ignore_index = ignore_index;
  a.num_threads = num_threads;
  a.mode = mode;
  a.chunk_columns = chunk_columns;
  a.kernels = kernels;
  py::gil_scoped_release release;
  mllmcal::token_stats(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mllmcal C++ CPU kernels (torch-free; raw pointers, OpenMP)";
  m.def("token_stats", &token_stats_py,
        "Fused per-row token statistics of an [n, v] logits buffer; see mllmcal/_contract.py.\n"
        "Pointers are integer addresses; strides are in elements. labels, temperature_rows,\n"
        "scaled_out and hist may be 0 (absent). mode: 0 auto, 1 one chunk per row, 2 split\n"
        "rows into vocabulary chunks (chunk_columns wide, or automatic when <= 0).\n"
        "num_threads <= 0 uses the OpenMP default. isa: '' (best), 'generic', 'avx2', 'avx512'.",
        py::arg("x"), py::arg("n"), py::arg("v"), py::arg("x_row_stride"), py::arg("dtype"),
        py::arg("labels"), py::arg("temperature"), py::arg("temperature_rows"), py::arg("fstats"),
        py::arg("pred"), py::arg("flags"), py::arg("scaled_out"), py::arg("out_row_stride"),
        py::arg("hist"), py::arg("n_bins"), py::arg("ignore_index"), py::arg("num_threads") = 0,
        py::arg("mode") = 0, py::arg("chunk_columns") = 0, py::arg("isa") = "");
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
  mllmcal::register_temperature_fit(m);
}
