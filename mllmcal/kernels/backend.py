"""The ``triton`` backend as the registry loads it (:mod:`mllmcal._backends.registry`):
the launch helpers of every Triton op, in one namespace. Importing it imports Triton, so
the registry imports it lazily and reads an ``ImportError`` as "backend unavailable"."""

from __future__ import annotations

from .temperature_fit import temperature_fit_into
from .token_stats import token_stats_into, unavailable_reason

__all__ = ["temperature_fit_into", "token_stats_into", "unavailable_reason"]
