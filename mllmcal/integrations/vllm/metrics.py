"""The ``mllmcal_*`` Prometheus metrics of the vLLM integration, one set per process."""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

__all__ = ["CONFIDENCE_BUCKETS", "ENTROPY_BUCKETS", "metrics", "observe_token",
           "count_record", "count_feedback", "count_write_error", "set_temperature"]

_log = logging.getLogger("mllmcal")

# Buckets of the Prometheus histograms. Confidence lives in [0, 1]; entropy in nats in
# [0, log V] (log 32000 ≈ 10.4, log 262144 ≈ 12.5).
CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)

_metrics_lock = threading.Lock()
_metrics: dict[str, Any] | None = None


def metrics() -> dict[str, Any] | None:
    """The process's ``mllmcal_*`` Prometheus metrics, created on first use (None without
    ``prometheus_client``).

    Once per process: prometheus_client refuses a second metric of a name in a registry.
    In multiprocess mode (see the package docstring) the gauges show the most recent value
    set by any process (``multiprocess_mode="mostrecent"``), not a sum.
    """
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            try:
                from prometheus_client import Counter, Gauge, Histogram
            except ImportError:
                _log.warning("prometheus_client is not installed: no mllmcal_* metrics")
                _metrics = {}
                return None
            m = {
                "confidence": Histogram("mllmcal_token_confidence", "Confidence (max "
                                        "probability at the calibration temperature) of each "
                                        "generated token", buckets=CONFIDENCE_BUCKETS),
                "entropy": Histogram("mllmcal_token_entropy", "Entropy in nats of the full "
                                     "next-token distribution of each generated token",
                                     buckets=ENTROPY_BUCKETS),
                "requests": Counter("mllmcal_requests",
                                    "Requests whose mllmcal record was completed"),
                "feedback": Counter("mllmcal_feedback", "Correctness feedback items applied"),
                "write_errors": Counter("mllmcal_records_write_errors", "Failed attempts to "
                                        "write request records (they are retried)"),
            }
            for name, doc in (("ece", "Expected calibration error (L1) of the feedback so far"),
                              ("accuracy", "Accuracy of the feedback so far"),
                              ("temperature", "Temperature used for the statistics")):
                m[name] = Gauge(f"mllmcal_{name}", doc, multiprocess_mode="mostrecent")
            _metrics = m
        return _metrics or None


# The updates below take the dict returned by metrics() (None: metrics are off).

def observe_token(m: dict[str, Any] | None, confidence: float, entropy: float) -> None:
    """One generated token's confidence and entropy (NaN confidence: not observed)."""
    if m and not math.isnan(confidence):
        m["confidence"].observe(confidence)
        m["entropy"].observe(entropy)


def count_record(m: dict[str, Any] | None) -> None:
    """One request's record was completed."""
    if m:
        m["requests"].inc()


def count_write_error(m: dict[str, Any] | None) -> None:
    """One attempt to write records failed (they stay queued and are retried)."""
    if m:
        m["write_errors"].inc()


def count_feedback(m: dict[str, Any] | None, state: Any, temperature: float) -> None:
    """One feedback item was applied to ``state`` (a CalibrationState); the gauges follow."""
    if m:
        m["feedback"].inc()
        m["ece"].set(state.ece("l1"))
        m["accuracy"].set(state.accuracy())
        m["temperature"].set(temperature)


def set_temperature(m: dict[str, Any] | None, temperature: float) -> None:
    if m:
        m["temperature"].set(temperature)
