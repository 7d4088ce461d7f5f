// The pybind11 signatures shared by mllmcal._C (csrc/cpu/module.cpp) and mllmcal._C_cuda
// (csrc/cuda/bindings.cpp). Both extensions bind each op with the same argument names in
// the same order, then a tail of their own launch arguments (threads, work split and ISA
// on the CPU; workspace, splits and stream on CUDA), so one Python marshaller serves both
// (mllmcal/_backends/compiled.py). Pointers arrive as Python ints (0 = absent), strides in
// elements, dtype codes 0 fp32, 1 fp16, 2 bf16. Only cheap structural checks live here (a
// bad pointer cannot be checked); value checks (label range, temperatures, betas) are
// done in Python before the call. Header-only; no torch and no CUDA headers.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace mllmcal_bindings {

namespace py = pybind11;

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Checks and stores the arguments both ops open with: the [n, v] logits (any row stride
// >= 0: rows are only read, so they may repeat or overlap, "any strides along rows") and
// the labels.
template <class Args>
void set_rows(Args& a, std::uintptr_t x, int dtype, int64_t n, int64_t v, int64_t stride_x,
              std::uintptr_t labels, int64_t ignore_index) {
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                std::to_string(dtype));
  if (n < 0 || v < 1) throw std::invalid_argument("need n >= 0 and v >= 1");
  if (n > 1 && stride_x < 0) throw std::invalid_argument("stride_x must be >= 0");
  a.x = ptr<const void>(x);
  a.dtype = dtype;
  a.n = n;
  a.v = v;
  a.stride_x = stride_x;
  a.labels = ptr<const int64_t>(labels);
  a.ignore_index = ignore_index;
}

// The keyword names of set_rows' arguments, in order.
#define MLLMCAL_ROWS_PY_ARGS                                                                \
  py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("v"), py::arg("stride_x"),          \
      py::arg("labels"), py::arg("ignore_index")

// Binds token_stats(x, dtype, n, v, stride_x, labels, ignore_index, temperature,
// temperature_rows, fstats, pred, flags, scaled_out, stride_out, hist, n_bins, <tail>):
// checks the common arguments, fills an `Args` and calls `launch(args, tail...)`.
template <class Args, class... Tail, class... TailArgs>
void def_token_stats(py::module_& m, void (*launch)(Args&, Tail...), const char* doc,
                     TailArgs... tail_args) {
  m.def(
      "token_stats",
      [launch](std::uintptr_t x, int dtype, int64_t n, int64_t v, int64_t stride_x,
               std::uintptr_t labels, int64_t ignore_index, double temperature,
               std::uintptr_t temperature_rows, std::uintptr_t fstats, std::uintptr_t pred,
               std::uintptr_t flags, std::uintptr_t scaled_out, int64_t stride_out,
               std::uintptr_t hist, int64_t n_bins, Tail... tail) {
        Args a{};
        set_rows(a, x, dtype, n, v, stride_x, labels, ignore_index);
        if (n > 0 && (x == 0 || fstats == 0 || pred == 0 || flags == 0))
          throw std::invalid_argument("x, fstats, pred and flags must be non-null");
        if (scaled_out != 0 && n > 1 && stride_out < v)
          throw std::invalid_argument("stride_out must be >= v (written rows may not overlap)");
        if (hist != 0 && n_bins < 1)
          throw std::invalid_argument("n_bins must be >= 1 with a histogram");
        if (!(temperature > 0.0)) throw std::invalid_argument("temperature must be > 0");
        a.temperature = static_cast<float>(temperature);
        a.temperature_rows = ptr<const float>(temperature_rows);
        a.fstats = ptr<float>(fstats);
        a.pred = ptr<int64_t>(pred);
        a.flags = ptr<uint8_t>(flags);
        a.scaled_out = ptr<void>(scaled_out);
        a.stride_out = stride_out;
        a.hist = ptr<int64_t>(hist);
        a.n_bins = static_cast<decltype(a.n_bins)>(n_bins);
        launch(a, tail...);
      },
      doc, MLLMCAL_ROWS_PY_ARGS, py::arg("temperature"),
      py::arg("temperature_rows"), py::arg("fstats"), py::arg("pred"), py::arg("flags"),
      py::arg("scaled_out"), py::arg("stride_out"), py::arg("hist"), py::arg("n_bins"),
      tail_args...);
}

// Binds temperature_fit(x, dtype, n, v, stride_x, labels, ignore_index, betas, k, out,
// status, <tail>) the same way.
template <class Args, class... Tail, class... TailArgs>
void def_temperature_fit(py::module_& m, void (*launch)(Args&, Tail...), const char* doc,
                         TailArgs... tail_args) {
  m.def(
      "temperature_fit",
      [launch](std::uintptr_t x, int dtype, int64_t n, int64_t v, int64_t stride_x,
               std::uintptr_t labels, int64_t ignore_index, std::uintptr_t betas, int64_t k,
               std::uintptr_t out, std::uintptr_t status, Tail... tail) {
        Args a{};
        set_rows(a, x, dtype, n, v, stride_x, labels, ignore_index);
        if (k < 1) throw std::invalid_argument("need k >= 1");
        if (n > 0 && (x == 0 || labels == 0 || betas == 0 || out == 0 || status == 0))
          throw std::invalid_argument("x, labels, betas, out and status must be non-null");
        a.betas = ptr<const float>(betas);
        a.k = k;
        a.out = ptr<float>(out);
        a.status = ptr<uint8_t>(status);
        launch(a, tail...);
      },
      doc, MLLMCAL_ROWS_PY_ARGS, py::arg("betas"), py::arg("k"),
      py::arg("out"), py::arg("status"), tail_args...);
}

}  // namespace mllmcal_bindings
