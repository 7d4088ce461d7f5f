"""Triton kernels and their launch helpers (runtime only; ahead-of-time compile checks
live in ``tools/aot.py``).

Importing this package never imports Triton; the backend registry imports
:mod:`mllmcal.kernels.backend` lazily, and that import raises ``ImportError`` when Triton
is missing, which the registry turns into "backend unavailable".
"""
