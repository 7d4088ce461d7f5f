"""The feedback book shared by the ``transformers`` and vLLM integrations.

A generated answer is often judged long after it was produced (a user's thumbs-up, a
grader, a test). Both integrations keep, per request id, what the verdict will need
(an answer's confidence, or the logits row of its answer token), bounded in number, and
add ``(confidence, correct)`` -- or the kept row with its right token -- to a
:class:`mllmcal.CalibrationState` when the verdict arrives. :class:`FeedbackBook` is that
book; :func:`sequence_scores` and :func:`pick_confidence` turn token log-probabilities
into the one sequence confidence an answer is scored with.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

__all__ = [
    "FeedbackBook",
    "SEQUENCE_CONFIDENCE_KINDS",
    "new_calibration_state",
    "pick_confidence",
    "sequence_scores",
]

SEQUENCE_CONFIDENCE_KINDS = ("product", "mean", "min")

E = TypeVar("E")


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
    """The ``[B]`` sequence confidence of ``kind`` (``"product"``, ``"mean"`` or ``"min"``)
    from :func:`sequence_scores`' output."""
    if kind not in SEQUENCE_CONFIDENCE_KINDS:
        raise ValueError(f"kind must be one of {SEQUENCE_CONFIDENCE_KINDS}, got {kind!r}")
    return {"product": scores["product"], "mean": scores["mean_prob"], "min": scores["min_prob"]}[kind]


def new_calibration_state(n_bins: int, device: torch.device | str | None = None) -> Any:
    """A fresh :class:`mllmcal.CalibrationState`, imported on first use: the calibration
    layer is optional for the token statistics the integrations compute."""
    try:
        from ..calibration import CalibrationState
    except ImportError as exc:
        raise ImportError(
            "correctness feedback needs mllmcal.calibration.CalibrationState, which could not "
            f"be imported: {exc}"
        ) from exc
    return CalibrationState(n_bins=n_bins, device=device)


class FeedbackBook(Generic[E]):
    """Entries waiting for correctness feedback, keyed by request id, and the calibration
    state their feedback feeds.

    Args:
        n_bins: bins of :attr:`state`.
        max_pending: entries that may wait; past that :meth:`trim` drops the oldest.
        device: device of :attr:`state` (created on first use; settable until then).
        on_drop: called with the number of entries :meth:`trim` dropped (e.g. to warn).

    Entries are whatever the integration needs at scoring time (``E``); the book only
    keeps them in arrival order. Not thread-safe: the owner serialises access.
    """

    def __init__(self, n_bins: int = 15, max_pending: int = 100_000, *,
                 device: torch.device | str | None = None,
                 on_drop: Callable[[int], None] | None = None) -> None:
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self.max_pending = int(max_pending)
        self.device = device
        self.n_feedback = 0
        self._on_drop = on_drop
        self._state: Any = None
        self._pending: OrderedDict[Hashable, E] = OrderedDict()

    # ------------------------------------------------------------------ waiting entries

    def put(self, key: Hashable, entry: E) -> bool:
        """File ``entry`` under ``key`` as the newest; returns whether it replaced one.
        Call :meth:`trim` after a batch of puts."""
        replaced = key in self._pending
        self._pending[key] = entry
        self._pending.move_to_end(key)
        return replaced

    def replace(self, key: Hashable, entry: E) -> None:
        """Change a waiting entry in place (its age is kept)."""
        self._pending[key] = entry

    def trim(self) -> int:
        """Drop the oldest entries beyond ``max_pending``; returns how many."""
        dropped = 0
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            dropped += 1
        if dropped and self._on_drop is not None:
            self._on_drop(dropped)
        return dropped

    def take(self, key: Hashable) -> E | None:
        """Remove and return the entry waiting under ``key`` (None if there is none)."""
        return self._pending.pop(key, None)

    def get(self, key: Hashable) -> E | None:
        """The entry waiting under ``key``, left in place."""
        return self._pending.get(key)

    def discard(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def items(self) -> list[tuple[Hashable, E]]:
        """``(key, entry)`` pairs, oldest first (a copy: safe to change the book while
        iterating)."""
        return list(self._pending.items())

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ scoring

    @property
    def state(self) -> Any:
        """The :class:`mllmcal.CalibrationState` fed by :meth:`score` and
        :meth:`score_logits`."""
        if self._state is None:
            self._state = new_calibration_state(self.n_bins, self.device)
        return self._state

    def score(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Add answers with confidence ``confidence`` ``[n]`` (fp32) and correctness
        ``correct`` ``[n]`` (bool) to :attr:`state`."""
        self.state.update(confidence, correct.to(confidence.device))
        self.n_feedback += int(confidence.numel())

    def score_logits(self, row: torch.Tensor, label: int, temperature: float) -> None:
        """Add one answer from its logits ``row`` ``[V]`` and the right token ``label``,
        scored exactly at ``temperature`` (histogram, NLL, Brier)."""
        st = self.state
        row = row.to(st.device)
        st.update_logits(row[None], torch.tensor([label], device=row.device),
                         temperature=temperature)
        self.n_feedback += 1

    def calibration(self) -> dict[str, float] | None:
        """``count``, ``accuracy``, ``ece``, ``ece_l2`` and ``mce`` of :attr:`state` (None
        before any feedback)."""
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
