"""mllmcal: measure and fix the calibration of (multimodal) language models as they generate.

Nothing compiled is required to import this package: a missing ``_C`` extension or a
missing Triton degrades to the next backend (see :func:`mllmcal.available_backends`).
"""

from __future__ import annotations

from .ops import TokenStats, available_backends, token_stats

__version__ = "0.1.0"

__all__ = ["TokenStats", "available_backends", "token_stats", "__version__"]
