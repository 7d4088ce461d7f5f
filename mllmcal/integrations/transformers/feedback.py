"""Request feedback and monitoring for :class:`~.processor.CalibratedLogitsProcessor`."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._feedback import SEQUENCE_CONFIDENCE_KINDS, FeedbackBook, sequence_scores

__all__ = ["FeedbackMonitor", "PendingRow", "SEQUENCE_CONFIDENCE_KINDS", "sequence_scores"]


@dataclass(frozen=True)
class PendingRow:
    """A generated row waiting for feedback.

    Attributes:
        source: the open run's key while it runs (the processor's run record); once the
            run ended, its fp32 ``[B]`` sequence confidences.
        row: the row's index in that run's batch.
    """

    source: Any
    row: int


class FeedbackMonitor(FeedbackBook[PendingRow]):
    """The shared :class:`~mllmcal.integrations._feedback.FeedbackBook` (rows waiting for a
    verdict, by request id, and the :class:`mllmcal.CalibrationState` it feeds) with what a
    ``generate`` processor adds: a waiting row points at its run until the run's last
    tokens are known, then holds the run's ``[B]`` sequence confidences; and every finished
    run's token-level statistics are folded into running totals for dashboards. It holds
    O(pending rows + n_bins) state and never touches a ``[B, V]`` tensor. The processor
    owns one (``proc.monitor``) and forwards to it.

    Args:
        n_bins: bins of the calibration histogram and of the token-confidence histogram.
        sequence_confidence: ``"product"``, ``"mean"`` or ``"min"`` (see
            :func:`~mllmcal.integrations._feedback.sequence_scores`).
        max_pending: rows that may wait for feedback; past that the oldest are dropped
            with a warning.

    Example:
        >>> import torch
        >>> mon = FeedbackMonitor(n_bins=10)
        >>> mon.open_rows("run", ["q1", "q2"])
        >>> mon.close_rows("run", torch.tensor([0.9, 0.4]))
        >>> mon.take("q2")
        PendingRow(source=tensor([0.9000, 0.4000]), row=1)
        >>> mon.score(torch.tensor([0.4]), torch.tensor([True]))
        >>> mon.n_pending, mon.calibration()["accuracy"]
        (1, 1.0)
    """

    def __init__(self, n_bins: int = 15, sequence_confidence: str = "product",
                 max_pending: int = 100_000) -> None:
        super().__init__(n_bins, max_pending, on_drop=self._warn_dropped)
        if sequence_confidence not in SEQUENCE_CONFIDENCE_KINDS:
            raise ValueError(
                f"sequence_confidence must be one of {SEQUENCE_CONFIDENCE_KINDS}, "
                f"got {sequence_confidence!r}"
            )
        self.sequence_confidence_kind = sequence_confidence
        # [count, Σ confidence, Σ entropy] in fp64 and an int64 [n_bins] confidence
        # histogram over the finished runs' live token rows, kept on the device.
        self._totals: torch.Tensor | None = None
        self._token_hist: torch.Tensor | None = None
        self.n_runs = 0
        self.n_steps = 0

    def _warn_dropped(self, n: int) -> None:
        warnings.warn(
            f"CalibratedLogitsProcessor: dropped {n} rows that waited too long for "
            f"feedback (max_pending={self.max_pending})", RuntimeWarning, stacklevel=5,
        )

    # ------------------------------------------------------------------ runs

    def open_rows(self, owner: object, request_ids: Sequence[Hashable]) -> None:
        """Register the rows of a run that just started under their request ids."""
        for row, rid in enumerate(request_ids):
            self.put(rid, PendingRow(owner, row))
        self.trim()

    def close_rows(self, owner: object, confidence: torch.Tensor | None, why: str = "") -> None:
        """The run ``owner`` ended: its waiting rows now hold their sequence confidence, or
        are dropped with a warning when it could not be known (``confidence`` None)."""
        if confidence is None:
            n = self.drop_rows(owner)
            if n:
                warnings.warn(
                    f"CalibratedLogitsProcessor: {n} rows waiting for feedback were "
                    f"dropped: {why}", RuntimeWarning, stacklevel=4,
                )
            return
        for rid, e in self.items():
            if e.source is owner:
                self.replace(rid, PendingRow(confidence, e.row))

    def drop_rows(self, owner: object) -> int:
        """Drop the waiting rows of the run ``owner`` without a warning; returns how many."""
        mine = [rid for rid, e in self.items() if e.source is owner]
        for rid in mine:
            self.discard(rid)
        return len(mine)

    def fold_totals(self, totals: torch.Tensor, hist: torch.Tensor, steps: int) -> None:
        """Add a finished run's token totals (see :meth:`token_summary`)."""
        if self._totals is None or self._totals.device != totals.device:
            self._totals, self._token_hist = totals, hist
        else:
            self._totals = self._totals + totals
            self._token_hist = self._token_hist + hist
        self.n_runs += 1
        self.n_steps += steps

    # ------------------------------------------------------------------ summaries

    def token_summary(self, running: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
        """``tokens``, ``mean_confidence``, ``mean_entropy`` and ``confidence_histogram``
        over the finished runs plus ``running`` (the open run's totals). A host sync."""
        totals, hist = self._totals, self._token_hist
        if running is not None:
            t, h = running
            totals = t if totals is None else totals + t.to(totals.device)
            hist = h if hist is None else hist + h.to(hist.device)
        count, sc, se = (0, 0.0, 0.0) if totals is None else totals.tolist()
        return {
            "tokens": int(count),
            "mean_confidence": sc / count if count else float("nan"),
            "mean_entropy": se / count if count else float("nan"),
            "confidence_histogram": [0] * self.n_bins if hist is None else hist.tolist(),
        }
