"""Request feedback and monitoring for :class:`~.processor.CalibratedLogitsProcessor`.

A generated answer is often judged long after ``generate`` returns (a user's thumbs-up, a
grader, a test). :class:`FeedbackMonitor` keeps, per request id, the row's *sequence
confidence* (one number in ``[0, 1]`` from its token log-probabilities) until the verdict
arrives, then adds ``(confidence, correct)`` to a :class:`mllmcal.CalibrationState`. It
also folds every finished run's token-level statistics into running totals for
dashboards. It holds O(pending rows + n_bins) state and never touches a ``[B, V]`` tensor.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch

__all__ = ["FeedbackMonitor", "SEQUENCE_CONFIDENCE_KINDS", "sequence_scores"]

SEQUENCE_CONFIDENCE_KINDS = ("product", "mean", "min")


def sequence_scores(lp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sequence-level scores of token log-probabilities ``lp`` ``[B, T]`` (NaN = no token).

    Returns fp32 ``[B]`` tensors: ``mean_logprob``, ``mean_prob`` (geometric mean token
    probability), ``min_prob``, ``product`` (joint probability) and ``n_tokens`` (int64).
    Rows without tokens get NaN.

    Example:
        >>> lp = torch.tensor([[-0.5, -1.0, float("nan")], [float("nan")] * 3])
        >>> s = sequence_scores(lp)
        >>> s["n_tokens"].tolist(), round(float(s["mean_logprob"][0]), 3)
        ([2, 0], -0.75)
        >>> bool(torch.isnan(s["product"][1]))
        True
    """
    keep = ~torch.isnan(lp)
    n = keep.sum(-1)
    total = torch.where(keep, lp, torch.zeros_like(lp)).sum(-1)
    if lp.shape[-1]:
        lo = torch.where(keep, lp, torch.full_like(lp, float("inf"))).amin(-1)
    else:
        lo = torch.full(lp.shape[:-1], float("inf"), device=lp.device)
    nan = torch.full_like(total, float("nan"))
    has = n > 0
    mean = torch.where(has, total / n.clamp(min=1), nan)
    return {
        "mean_logprob": mean,
        "mean_prob": torch.exp(mean),
        "min_prob": torch.where(has, torch.exp(lo), nan),
        "product": torch.where(has, torch.exp(total), nan),
        "n_tokens": n,
    }


def pick_confidence(scores: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if kind not in SEQUENCE_CONFIDENCE_KINDS:
        raise ValueError(f"kind must be one of {SEQUENCE_CONFIDENCE_KINDS}, got {kind!r}")
    return {"product": scores["product"], "mean": scores["mean_prob"], "min": scores["min_prob"]}[kind]


def _new_state(n_bins: int, device: torch.device | None):
    try:
        from ...calibration import CalibrationState
    except ImportError as exc:  # the calibration layer is optional for token statistics
        raise ImportError(
            "correctness feedback needs mllmcal.calibration.CalibrationState, which could not "
            f"be imported: {exc}"
        ) from exc
    return CalibrationState(n_bins=n_bins, device=device)


class FeedbackMonitor:
    """Rows waiting for correctness feedback, the calibration state it feeds, and running
    token-level totals. The processor owns one (``proc.monitor``) and forwards to it.

    Args:
        n_bins: bins of the calibration histogram and of the token-confidence histogram.
        sequence_confidence: ``"product"``, ``"mean"`` or ``"min"`` (see
            :func:`sequence_scores`).
        max_pending: rows that may wait for feedback; past that the oldest are dropped
            with a warning.
    """

    def __init__(self, n_bins: int = 15, sequence_confidence: str = "product",
                 max_pending: int = 100_000) -> None:
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if sequence_confidence not in SEQUENCE_CONFIDENCE_KINDS:
            raise ValueError(
                f"sequence_confidence must be one of {SEQUENCE_CONFIDENCE_KINDS}, "
                f"got {sequence_confidence!r}"
            )
        self.n_bins = int(n_bins)
        self.sequence_confidence_kind = sequence_confidence
        self.max_pending = int(max_pending)
        self.state_device: torch.device | None = None
        self._state = None
        # [count, Σ confidence, Σ entropy] in fp64 and an int64 [n_bins] confidence
        # histogram over the finished runs' live token rows, kept on the device.
        self._totals: torch.Tensor | None = None
        self._token_hist: torch.Tensor | None = None
        self.n_runs = 0
        self.n_steps = 0
        self.n_feedback = 0
        # request id -> (owner, row); owner is the open run's key while it runs, then the
        # run's [B] sequence confidences.
        self._pending: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    # ------------------------------------------------------------------ runs

    def open_rows(self, owner: object, request_ids: Sequence[Hashable]) -> None:
        """Register the rows of a run that just started under their request ids."""
        for row, rid in enumerate(request_ids):
            self._pending[rid] = (owner, row)
            self._pending.move_to_end(rid)
        self._trim()

    def close_rows(self, owner: object, confidence: torch.Tensor | None, why: str = "") -> None:
        """The run ``owner`` ended: its waiting rows now hold their sequence confidence, or
        are dropped with a warning when it could not be known (``confidence`` None)."""
        mine = [rid for rid, (o, _) in self._pending.items() if o is owner]
        if confidence is None:
            for rid in mine:
                del self._pending[rid]
            if mine:
                warnings.warn(
                    f"CalibratedLogitsProcessor: {len(mine)} rows waiting for feedback were "
                    f"dropped: {why}", RuntimeWarning, stacklevel=4,
                )
            return
        for rid in mine:
            self._pending[rid] = (confidence, self._pending[rid][1])

    def fold_totals(self, totals: torch.Tensor, hist: torch.Tensor, steps: int) -> None:
        """Add a finished run's token totals (see :meth:`token_summary`)."""
        if self._totals is None or self._totals.device != totals.device:
            self._totals, self._token_hist = totals, hist
        else:
            self._totals = self._totals + totals
            self._token_hist = self._token_hist + hist
        self.n_runs += 1
        self.n_steps += steps

    def _trim(self) -> None:
        dropped = 0
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            dropped += 1
        if dropped:
            warnings.warn(
                f"CalibratedLogitsProcessor: dropped {dropped} rows that waited too long for "
                f"feedback (max_pending={self.max_pending})",
                RuntimeWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ feedback

    @property
    def state(self):
        """The :class:`mllmcal.CalibrationState` fed by :meth:`add_feedback`."""
        if self._state is None:
            self._state = _new_state(self.n_bins, self.state_device)
        return self._state

    def take(self, key: Hashable) -> tuple[Any, int] | None:
        """Remove and return ``(owner_or_confidences, row)`` of a waiting request id."""
        return self._pending.pop(key, None)

    def discard(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        self.state.update(confidence, correct.to(confidence.device))
        self.n_feedback += int(confidence.numel())

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ summaries

    def token_summary(self, running: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
        """``tokens``, ``mean_confidence``, ``mean_entropy`` and ``confidence_histogram``
        over the finished runs plus ``running`` (the open run's totals). A host sync."""
        totals, hist = self._totals, self._token_hist
        if running is not None:
            t, h = running
            totals = t if totals is None else totals + t.to(totals.device)
            hist = h if hist is None else hist + h.to(hist.device)
        if totals is None:
            return {"tokens": 0, "mean_confidence": float("nan"), "mean_entropy": float("nan"),
                    "confidence_histogram": [0] * self.n_bins}
        count, sc, se = totals.tolist()
        return {
            "tokens": int(count),
            "mean_confidence": sc / count if count else float("nan"),
            "mean_entropy": se / count if count else float("nan"),
            "confidence_histogram": hist.tolist(),
        }

    def calibration(self) -> dict[str, float] | None:
        """Metrics of :attr:`state` (None before any feedback)."""
        if self._state is None or not self.n_feedback:
            return None
        st = self._state
        return {
            "count": int(st.count),
            "accuracy": float(st.accuracy()),
            "ece": float(st.ece(norm="l1")),
            "ece_l2": float(st.ece(norm="l2")),
            "mce": float(st.ece(norm="max")),
        }
