"""Build mllmcal's compiled kernels.

Two extension modules, both torch-free pybind11 over raw pointers (see docs/design.md):

* ``mllmcal._C`` -- the C++ CPU kernels in ``csrc/cpu``; always built (g++ and OpenMP).
* ``mllmcal._C_cuda`` -- the CUDA kernels in ``csrc/cuda``; built when nvcc is found.
  ``MLLMCAL_BUILD_CUDA=0`` forces it off, ``=1`` forces it on (failing loudly without
  nvcc). ``MLLMCAL_CUDA_ARCH`` picks the architectures (default ``90``).

Build without isolation so that pip never fetches a second torch:
``pip install --no-build-isolation -e .``
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc() -> str | None:
    for candidate in (
        os.environ.get("NVCC"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _cuda_home(nvcc: str) -> str:
    """The toolkit root (with include/cuda_runtime.h). Not always nvcc's parent: nvcc on
    PATH may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    raise RuntimeError(f"no CUDA toolkit (include/cuda_runtime.h) found for {nvcc}; set CUDA_HOME")


def _want_cuda() -> tuple[bool, str | None]:
    flag = os.environ.get("MLLMCAL_BUILD_CUDA", "").strip()
    nvcc = _find_nvcc()
    if flag == "0":
        return False, nvcc
    if flag == "1" and nvcc is None:
        raise RuntimeError("MLLMCAL_BUILD_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
    return nvcc is not None, nvcc


def _cuda_arch_flags() -> list[str]:
    archs = os.environ.get("MLLMCAL_CUDA_ARCH", "90").replace(";", ",").split(",")
    flags = []
    for arch in filter(None, (a.strip() for a in archs)):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


class BuildExt(build_ext):
    """Compiles ``.cu`` sources with nvcc to objects, the rest with the C++ compiler."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            nvcc = _find_nvcc()
            objects = []
            build_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(build_dir, exist_ok=True)
            for src in cu_sources:
                obj = os.path.join(build_dir, os.path.basename(src) + ".o")
                # No --use_fast_math: it makes `/` approximate (the contract needs
                # z = x / T correctly rounded) and 1/S, log S less accurate; the kernels
                # use ex2.approx explicitly where an approximation is wanted.
                cmd = [
                    nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17",
                    "-Xcompiler", "-fPIC", "-lineinfo", *_cuda_arch_flags(),
                ]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
                objects.append(obj)
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def _extensions():
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    exts = [
        Pybind11Extension(
            "mllmcal._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            # The kernel lives mostly in headers: without them here, an in-place rebuild
            # after a header-only change would keep the old .so.
            depends=sorted(glob.glob("csrc/cpu/*.h") + glob.glob("csrc/common/*.h")),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
                                *openmp],
            extra_link_args=openmp,
        )
    ]
    build_cuda, nvcc = _want_cuda()
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    if build_cuda and cu:
        cuda_home = _cuda_home(nvcc)
        lib_dirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"))
                    if os.path.isdir(d)]
        exts.append(
            Pybind11Extension(
                "mllmcal._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cpp")) + cu,
                depends=sorted(glob.glob("csrc/cuda/*.h") + glob.glob("csrc/common/*.h")),
                include_dirs=["csrc", os.path.join(cuda_home, "include")],
                library_dirs=lib_dirs,
                runtime_library_dirs=lib_dirs,
                libraries=["cudart"],
                cxx_std=17,
                extra_compile_args=["-O3"],
            )
        )
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
