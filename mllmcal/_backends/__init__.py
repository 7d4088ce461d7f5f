"""The backend registry of every fused op (see :mod:`mllmcal._backends.registry`).

``compiled`` (the ``cpu`` and ``cuda`` backends: pointers into ``mllmcal._C`` and
``mllmcal._C_cuda``), ``composite`` (the ``torch`` backend), ``launch`` (the row/split plan
shared by the CUDA and Triton launchers). The Triton backend's code lives in
:mod:`mllmcal.kernels`.
"""

from __future__ import annotations

from .registry import unavailable_reason

__all__ = ["unavailable_reason"]
