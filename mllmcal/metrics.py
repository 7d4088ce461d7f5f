"""Public calibration metrics: ``mllmcal.metrics.ece(...)`` etc.

Re-exports :mod:`mllmcal.calibration.metrics` (see it for definitions and conventions).
"""

from .calibration import metrics as _metrics
from .calibration.metrics import *  # noqa: F403

__all__ = list(_metrics.__all__)
