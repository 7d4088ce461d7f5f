"""Triton kernels and their launch helpers.

Importing this package never imports Triton; ``mllmcal.ops`` imports the backend module
:mod:`mllmcal.kernels.token_stats` lazily, and that import raises ``ImportError`` when
Triton is missing, which ``ops`` turns into "backend unavailable".
"""
