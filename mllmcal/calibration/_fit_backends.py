"""Backends of the one-pass temperature-fit op: the same per-row accumulators everywhere.

``fit_rows(x, labels, betas, backend, ignore_index)`` returns, for an ``[N, V]`` logits
tensor, fp32 ``[N, 3, K]`` per-row (ℓ, dℓ/dβ, d²ℓ/dβ²) at the inverse temperatures ``betas``
and a uint8 ``[N]`` status (0 skipped: invalid row or ignored label; 1 used; 2 label masked,
i.e. x_y = −inf), with zeros in ``out`` wherever the row is not used. The float64
definition is :func:`mllmcal.reference.temperature_fit_rows`; the maths is written out next
to the kernels (``csrc/cpu/temperature_fit.h``, ``mllmcal/kernels/temperature_fit.py``).

============  ==============================================================================
``cpu``       ``mllmcal._C.temperature_fit`` (C++, OpenMP over rows; CPU tensors)
``cuda``      ``mllmcal._C_cuda.temperature_fit`` (CUDA tensors; built where nvcc is found)
``triton``    :mod:`mllmcal.kernels.temperature_fit` (CUDA tensors, or CPU under
              ``TRITON_INTERPRET=1``)
``torch``     a composite of torch ops, K passes of ``exp`` over row blocks (any device,
              fp64 input)
``auto``      CPU tensors: ``cpu`` if the extension has the kernel, else ``torch``; CUDA
              tensors: ``triton``, else ``cuda``, else ``torch``. ``MLLMCAL_BACKEND``
              overrides it, as for :func:`mllmcal.token_stats`.
============  ==============================================================================

This module is separate from :mod:`mllmcal.ops` (the token-statistics op and its custom-op
registration): the fit op is an offline accumulation, read back to the host per batch.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

__all__ = ["fit_rows", "available_fit_backends", "FIT_BACKENDS"]

FIT_BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Rows per block of the torch composite: bounds its [rows, V] fp32 temporaries to ~64 MB.
_TORCH_BLOCK_ELEMENTS = 1 << 24
# Where each compiled backend keeps its fit entry point.
_FIT_MODULES = {"cpu": "mllmcal._C", "cuda": "mllmcal._C_cuda",
                "triton": "mllmcal.kernels.temperature_fit"}


@functools.cache
def _module(name: str) -> ModuleType | ImportError:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # missing build, missing Triton: the backend is unavailable
        return exc


def _reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run the fit on ``device``, else why not.

    Device and extension availability are :func:`mllmcal.ops._device_reason`'s (one table
    for every op); this adds only what the fit needs on top: its entry point.
    """
    if backend not in FIT_BACKENDS[1:]:
        raise ValueError(f"backend must be one of {FIT_BACKENDS}, got {backend!r}")
    from .. import ops

    why = ops._device_reason(backend, device)
    if why is not None or backend == "torch":
        return why
    name = _FIT_MODULES[backend]
    mod = _module(name)
    if isinstance(mod, ImportError):
        return f"{name} is unavailable: {mod}"
    if backend != "triton" and not hasattr(mod, "temperature_fit"):
        return f"{name} was built before temperature_fit existed; rebuild the extension"
    return None


def available_fit_backends(device: torch.device | str = "cpu") -> list[str]:
    """The fit backends that can run on ``device`` here."""
    dev = torch.device(device)
    return [b for b in FIT_BACKENDS[1:] if _reason(b, dev) is None]


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` (``"auto"`` resolved) or a clear error."""
    if backend not in FIT_BACKENDS:
        raise ValueError(f"backend must be one of {FIT_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("MLLMCAL_BACKEND", "auto").strip().lower() or "auto"
        if env not in FIT_BACKENDS:
            raise ValueError(f"MLLMCAL_BACKEND must be one of {FIT_BACKENDS}, got {env!r}")
        backend = env
    if dtype not in _CODES:
        # fp64 (or anything else) is the torch composite's alone.
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend {backend!r} reads fp32/fp16/bf16 logits, got {dtype}")
        return "torch"
    if backend == "auto":
        order = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
        return next((b for b in order if _reason(b, device) is None), "torch")
    why = _reason(backend, device)
    if why is not None:
        raise RuntimeError(f"temperature-fit backend {backend!r} is unavailable: {why}")
    return backend


def _torch_rows(x: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor, out: torch.Tensor,
                status: torch.Tensor, ignore_index: int) -> None:
    """The composite: same definitions, torch ops, row blocks of bounded size."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, v = x.shape
    rows = max(1, _TORCH_BLOCK_ELEMENTS // max(1, v))
    b = betas.to(device=x.device, dtype=compute)
    for r0 in range(0, n, rows):
        xs = x[r0:r0 + rows].to(compute)
        y = labels[r0:r0 + rows]
        m = xs.amax(1)
        bad = torch.isnan(xs).any(1) | (xs == torch.inf).any(1)
        valid = ~bad & (m > -torch.inf) & (y != ignore_index)
        m_safe = torch.where(valid, m, 0.0)
        d = xs - m_safe[:, None]
        dy = d.gather(1, torch.where(y == ignore_index, 0, y)[:, None]).squeeze(1)
        used = valid & (dy > -torch.inf)
        d = torch.where(used[:, None], d, -torch.inf)
        res = torch.empty(xs.shape[0], 3, b.numel(), dtype=compute, device=x.device)
        for k in range(b.numel()):
            e = torch.exp(b[k] * d)
            dd = torch.where(e > 0, d, 0.0)  # 0 · inf guard: masked entries carry nothing
            s = e.sum(1)
            s_safe = torch.where(used, s, 1.0)
            mean = (e * dd).sum(1) / s_safe
            res[:, 0, k] = torch.log(s_safe) - b[k] * dy
            res[:, 1, k] = mean - dy
            res[:, 2, k] = ((e * dd * dd).sum(1) / s_safe - mean * mean).clamp_min(0.0)
        out[r0:r0 + rows] = torch.where(used[:, None, None], res, 0.0).to(out.dtype)
        status[r0:r0 + rows] = torch.where(used, 1, torch.where(valid, 2, 0)).to(torch.uint8)


def fit_rows(x: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor, backend: str = "auto",
             ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fit accumulators of an ``[N, V]`` logits tensor (see the module docstring).

    Args:
        x: ``[N, V]`` fp32/fp16/bf16 (fp64: torch backend) logits, any row stride.
        labels: int64 ``[N]`` on ``x``'s device, values in ``[0, V)`` or ``ignore_index``
            (checked by the caller).
        betas: ``[K]`` inverse temperatures > 0.
    Returns:
        ``(out, status)``: fp32 ``[N, 3, K]`` (fp64 for fp64 input) and uint8 ``[N]``, on
        ``x``'s device.
    """
    which = resolve_backend(backend, x.device, x.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, v = x.shape
    k = betas.numel()
    labels = labels.to(device=x.device, dtype=torch.int64).contiguous()
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(n, 3, k, dtype=out_dtype, device=x.device)
    status = torch.empty(n, dtype=torch.uint8, device=x.device)
    if n == 0:
        return out, status
    b32 = betas.to(device=x.device, dtype=torch.float32).contiguous()
    if which == "torch":
        _torch_rows(x, labels, betas.double(), out, status, ignore_index)
    elif which == "cpu":
        _module("mllmcal._C").temperature_fit(
            x.data_ptr(), n, v, x.stride(0), _CODES[x.dtype], labels.data_ptr(), ignore_index,
            b32.data_ptr(), k, out.data_ptr(), status.data_ptr(),
        )
    elif which == "cuda":
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _module("mllmcal._C_cuda").temperature_fit(
            x.data_ptr(), _CODES[x.dtype], n, v, x.stride(0), labels.data_ptr(), ignore_index,
            b32.data_ptr(), k, out.data_ptr(), status.data_ptr(), stream,
        )
    else:
        _module("mllmcal.kernels.temperature_fit").temperature_fit_into(
            x, labels, b32, out, status, ignore_index)
    return out, status
