// pybind11 binding of mllmcal._C.temperature_fit (raw pointers in, nothing returned; the
// GIL is released while the kernel runs). Registered from module.cpp with one call.
// Value checks (label range, betas > 0) are done in Python before the call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/temperature_fit.h"

namespace py = pybind11;

namespace mllmcal {

void register_temperature_fit(py::module_& m) {
  m.def(
      "temperature_fit",
      [](uintptr_t x, int64_t n, int64_t v, int64_t x_row_stride, int dtype, uintptr_t labels,
         int64_t ignore_index, uintptr_t betas, int64_t k, uintptr_t out, uintptr_t status,
         int num_threads) {
        if (dtype < 0 || dtype > 2)
          throw std::invalid_argument("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                      std::to_string(dtype));
        if (n < 0 || v < 1 || k < 1) throw std::invalid_argument("need n >= 0, v >= 1, k >= 1");
        if (n > 0 && (x == 0 || labels == 0 || betas == 0 || out == 0 || status == 0))
          throw std::invalid_argument("x, labels, betas, out and status must be non-null");
        if (n > 1 && x_row_stride < v)
          throw std::invalid_argument("x_row_stride must be >= v (rows may not overlap)");
        FitArgs a;
        a.x = reinterpret_cast<const void*>(x);
        a.n = n;
        a.v = v;
        a.x_row_stride = x_row_stride;
        a.dtype = dtype;
        a.labels = reinterpret_cast<const int64_t*>(labels);
        a.ignore_index = ignore_index;
        a.betas = reinterpret_cast<const float*>(betas);
        a.k = k;
        a.out = reinterpret_cast<float*>(out);
        a.status = reinterpret_cast<uint8_t*>(status);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        temperature_fit(a);
      },
      "Per-row NLL and its first two derivatives in beta = 1/T at k temperatures, one read\n"
      "of each [n, v] logits row (see csrc/cpu/temperature_fit.h). out: fp32 [n, 3, k];\n"
      "status: uint8 [n] (0 skipped, 1 used, 2 label masked).",
      py::arg("x"), py::arg("n"), py::arg("v"), py::arg("x_row_stride"), py::arg("dtype"),
      py::arg("labels"), py::arg("ignore_index"), py::arg("betas"), py::arg("k"), py::arg("out"),
      py::arg("status"), py::arg("num_threads") = 0);
}

}  // namespace mllmcal
