"""The ``cpu`` backend: forwards tensor pointers to the C++/OpenMP kernel of ``mllmcal._C``.

``mllmcal._C`` is torch-free (raw pointers, shapes, strides, a dtype code); this module is
the thin layer that turns validated tensors into those arguments. It checks nothing that
:mod:`mllmcal.ops` already validated. Importing it never fails because the extension is
missing: :func:`unavailable_reason` says why instead, and dispatch falls back.

Threads: the kernel uses ``torch.get_num_threads()`` threads (so ``torch.set_num_threads``
and ``OMP_NUM_THREADS`` govern it as they govern torch), or ``num_threads`` when given.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

__all__ = ["token_stats_into", "unavailable_reason", "kernel_isa", "DTYPE_CODES"]

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODES = {"auto": 0, "rows": 1, "split": 2}

_ext: ModuleType | None = None
_ext_error: Exception | None = None


def _load() -> ModuleType | None:
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module("mllmcal._C")
        except Exception as exc:  # a missing or broken .so is reported, not raised
            _ext_error = exc
    return _ext


def unavailable_reason() -> str | None:
    """None when the C++ kernel can run here, else why not."""
    if _load() is None:
        return f"cannot import mllmcal._C ({_ext_error})"
    return None


def kernel_isa() -> str:
    """Instruction set the kernel was dispatched to on this CPU (``generic``/``avx2``/``avx512``)."""
    ext = _load()
    if ext is None:
        raise RuntimeError(unavailable_reason())
    return ext.kernel_isa()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def token_stats_into(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    temperature_rows: torch.Tensor | None,
    fstats: torch.Tensor,
    pred: torch.Tensor,
    flags: torch.Tensor,
    scaled_out: torch.Tensor | None,
    hist: torch.Tensor | None,
    ignore_index: int,
    *,
    num_threads: int | None = None,
    mode: str = "auto",
    chunk_columns: int = 0,
    isa: str = "",
) -> None:
    """Fill ``fstats``/``pred``/``flags`` for CPU ``x`` ``[N, V]`` (see :mod:`mllmcal._contract`).

    Args beyond the contract (for tests and benchmarks):
        num_threads: OpenMP threads; default ``torch.get_num_threads()``.
        mode: ``"auto"``; ``"rows"`` forces one thread per row (path A); ``"split"``
            forces vocabulary chunks merged per row (path B).
        chunk_columns: chunk width for ``mode="split"`` (0: automatic).
        isa: force ``"generic"``, ``"avx2"`` or ``"avx512"`` (default: best for this CPU).
    """
    ext = _load()
    if ext is None:
        raise RuntimeError(unavailable_reason())
    n, v = x.shape
    ext.token_stats(
        x.data_ptr(), n, v, x.stride(0), DTYPE_CODES[x.dtype],
        _ptr(labels), float(temperature), _ptr(temperature_rows),
        fstats.data_ptr(), pred.data_ptr(), flags.data_ptr(),
        _ptr(scaled_out), 0 if scaled_out is None else scaled_out.stride(0),
        _ptr(hist), 0 if hist is None else hist.shape[1], int(ignore_index),
        torch.get_num_threads() if num_threads is None else int(num_threads),
        MODES[mode], int(chunk_columns), isa,
    )
