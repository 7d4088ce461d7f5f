"""The JSON-lines record of a finished request, and the file it is appended to."""

from __future__ import annotations

import json
import math
from typing import IO, Any

from .request import Request
from .token_logits import token_logits_field

__all__ = ["RecordWriter", "request_record"]


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def request_record(req: Request) -> dict[str, Any]:
    """The record of ``req``: ``id``, ``n_tokens``, ``token_ids``, per-token
    ``confidence``, ``entropy`` and ``logprob``, ``mean_logprob`` and ``min_prob`` (None
    unless every log-prob is exact), ``mean_confidence``, ``temperature``, ``finish``."""
    n = len(req.confidence)
    lps = req.logprob
    exact = n > 0 and all(lp is not None for lp in lps)
    return {
        "id": req.rid,
        "n_tokens": n,
        "token_ids": [int(t) for t in req.tokens[:n]],
        "confidence": req.confidence,
        "entropy": req.entropy,
        "logprob": lps,
        "mean_logprob": (sum(lps) / n) if exact else None,
        "min_prob": math.exp(min(lps)) if exact else None,
        "mean_confidence": _mean(req.confidence),
        "temperature": req.temperature,
        "finish": req.ended_by,
        **token_logits_field(req, n),
    }


class RecordWriter:
    """Appends records as JSON lines to ``path`` (opened on the first record; None: records
    are counted but not written)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        if self._file is None:
            # One write() per line on a file opened for append: lines from several
            # processes (data-parallel engines) interleave whole, never torn.
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
