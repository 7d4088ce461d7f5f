"""mllmcal: measure and fix the calibration of (multimodal) language models as they generate.

Nothing compiled is required to import this package: a missing ``_C`` extension or a
missing Triton degrades to the next backend (see :func:`mllmcal.available_backends`).
"""

from __future__ import annotations

from . import metrics
from .calibration import CalibrationState, OnlineTemperature, fit_temperature
from .linear import linear_token_stats
from .ops import TokenStats, available_backends, token_stats

__version__ = "0.1.0"

__all__ = [
    "CalibrationState",
    "OnlineTemperature",
    "TokenStats",
    "available_backends",
    "fit_temperature",
    "linear_token_stats",
    "metrics",
    "plot",
    "token_stats",
    "__version__",
]


def __getattr__(name: str):
    # ``mllmcal.plot`` imports matplotlib, which is slow and not needed to measure anything;
    # load it on first access only.
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
