// pybind11 binding of mllmcal._C_cuda.temperature_fit: forwards raw device pointers and the
// stream handle; value checks (labels, betas) are done in Python. Registered from
// bindings.cpp with one call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/temperature_fit.h"

namespace py = pybind11;

namespace mllmcal_cuda {

void register_temperature_fit(py::module_& m) {
  m.def(
      "temperature_fit",
      [](std::uintptr_t x, int dtype, int64_t n, int64_t v, int64_t stride_x,
         std::uintptr_t labels, int64_t ignore_index, std::uintptr_t betas, int64_t k,
         std::uintptr_t out, std::uintptr_t status, std::uintptr_t stream) {
        if (n > 0 && (x == 0 || labels == 0 || betas == 0 || out == 0 || status == 0))
          throw std::invalid_argument("temperature_fit: pointers must be non-null");
        TemperatureFitArgs a{};
        a.x = reinterpret_cast<const void*>(x);
        a.dtype = dtype;
        a.n = n;
        a.v = v;
        a.stride_x = stride_x;
        a.labels = reinterpret_cast<const int64_t*>(labels);
        a.ignore_index = ignore_index;
        a.betas = reinterpret_cast<const float*>(betas);
        a.k = k;
        a.out = reinterpret_cast<float*>(out);
        a.status = reinterpret_cast<uint8_t*>(status);
        a.stream = reinterpret_cast<void*>(stream);
        if (const char* err = temperature_fit(a))
          throw std::runtime_error(std::string("mllmcal CUDA temperature_fit: ") + err);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("v"), py::arg("stride_x"),
      py::arg("labels"), py::arg("ignore_index"), py::arg("betas"), py::arg("k"), py::arg("out"),
      py::arg("status"), py::arg("stream"),
      "Launch the one-pass temperature-fit kernel on `stream`: out fp32 [n, 3, k] (nll,\n"
      "dnll/dbeta, d2nll/dbeta2), status uint8 [n] (0 skipped, 1 used, 2 label masked).");
}

}  // namespace mllmcal_cuda
