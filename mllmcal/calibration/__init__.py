"""Streaming calibration: O(n_bins) state, metrics, temperature scaling, recalibration.

The maths (input checks, binning, ECE from bins, the two-limb carry) lives once in
:mod:`mllmcal.calibration.functional`; the classes here hold state and call it. Plots live
in :mod:`mllmcal.plot` (imported lazily, so this package never imports matplotlib).
"""

from . import functional, metrics
from .onepass import TemperatureFitAccumulator
from .recalibration import HistogramBinning, IsotonicRegression
from .state import CalibrationState
from .temperature import PAPER_TEMPERATURE_GRID, OnlineTemperature, fit_temperature

__all__ = [
    "CalibrationState",
    "HistogramBinning",
    "IsotonicRegression",
    "OnlineTemperature",
    "PAPER_TEMPERATURE_GRID",
    "TemperatureFitAccumulator",
    "fit_temperature",
    "functional",
    "metrics",
]
