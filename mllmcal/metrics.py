"""Public calibration metrics: ``mllmcal.metrics.ece(...)`` etc.

Re-exports :mod:`mllmcal.calibration.metrics` (see it for definitions and conventions).
"""

from .calibration.metrics import (
    BootstrapCI,
    accuracy,
    aurc,
    auroc,
    brier_score,
    debiased_l2_ece,
    ece,
    ece_bootstrap_ci,
    multiclass_brier_score,
    nll,
    risk_coverage_curve,
    smooth_ece,
)

__all__ = [
    "BootstrapCI",
    "accuracy",
    "auroc",
    "aurc",
    "brier_score",
    "debiased_l2_ece",
    "ece",
    "ece_bootstrap_ci",
    "multiclass_brier_score",
    "nll",
    "risk_coverage_curve",
    "smooth_ece",
]
