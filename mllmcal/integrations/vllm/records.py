"""The JSON-lines record of a finished request, and the file it is appended to."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Any

from .request import Request
from .token_logits import token_logits_field

__all__ = ["RecordWriter", "logprob_summary", "request_record"]

_log = logging.getLogger("mllmcal")


def logprob_summary(lps: list[float | None], n: int) -> dict[str, float | None]:
    """``mean_logprob`` and ``min_prob`` of ``n`` token log-probs (None unless all exact)."""
    exact = n > 0 and all(lp is not None for lp in lps)
    return {"mean_logprob": sum(lps) / n if exact else None,
            "min_prob": math.exp(min(lps)) if exact else None}


def request_record(req: Request) -> dict[str, Any]:
    """The record of ``req``: ``id``, ``n_tokens``, ``token_ids``, per-token
    ``confidence``, ``entropy`` and ``logprob``, ``mean_logprob`` and ``min_prob`` (see
    :func:`logprob_summary`), ``mean_confidence``, ``temperature``, ``finish``."""
    n = len(req.confidence)
    confs = [c for c in req.confidence if c is not None]
    return {
        "id": req.rid,
        "n_tokens": n,
        "token_ids": [int(t) for t in req.tokens[:n]],
        "confidence": req.confidence,
        "entropy": req.entropy,
        "logprob": req.logprob,
        **logprob_summary(req.logprob, n),
        "mean_confidence": sum(confs) / len(confs) if confs else None,
        "temperature": req.temperature,
        "finish": req.ended_by,
        **token_logits_field(req, n),
    }


class RecordWriter:
    """Appends records as JSON lines to ``path``, at least once and at most once each.

    A record is queued, then written with its line whole by :meth:`write` or, after a
    failure (the folder does not exist yet, the disk is full, no permission), by a later
    :meth:`retry` (the tracker calls it at every drain): a line leaves the queue only once
    the file holds all of its bytes. The first failure is logged (once per writer), every
    failed attempt calls ``on_error``; at most ``max_queued`` lines wait, older ones are
    dropped with an error. ``path`` None: records are counted but not written.
    """

    def __init__(self, path: str | None, *, on_error: Callable[[], None] | None = None,
                 max_queued: int = 100_000) -> None:
        self.path = path
        self.n_failed = 0    # failed write attempts
        self.n_dropped = 0   # lines dropped from a full queue
        self._fd: int | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._partial = 0    # bytes of the first queued line already in the file
        self._on_error = on_error
        self._max = max_queued
        self._warned = False
        self._lock = threading.Lock()

    @property
    def n_queued(self) -> int:
        """Records waiting to be written."""
        return len(self._queue)

    def write(self, record: dict[str, Any]) -> bool:
        """Queue ``record`` and write what is queued; True when nothing is left waiting."""
        if not self.path:
            return True
        with self._lock:
            self._queue.append((json.dumps(record, allow_nan=False) + "\n").encode())
            while len(self._queue) > self._max:
                self._queue.popleft()
                self._partial = 0
                self.n_dropped += 1
                _log.error("mllmcal: %d record(s) dropped: %s could not be written to for "
                           "too long", self.n_dropped, self.path)
            return self._write_queued()

    def retry(self) -> bool:
        """Write what earlier failures left queued; True when nothing is left waiting."""
        if not self._queue:
            return True
        with self._lock:
            return self._write_queued()

    def _write_queued(self) -> bool:
        q = self._queue
        try:
            if self._fd is None:
                # One write() per line on a file opened for append: lines from several
                # processes (data-parallel engines) interleave whole, never torn.
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            while q:
                line = q[0]
                while self._partial < len(line):
                    self._partial += os.write(self._fd, line[self._partial:])
                q.popleft()
                self._partial = 0
        except OSError as exc:
            self.n_failed += 1
            if self._on_error is not None:
                self._on_error()
            if not self._warned:
                self._warned = True
                _log.error("mllmcal: cannot write records to %s (%s); %d record(s) wait and "
                           "are retried at every drain (counted in "
                           "mllmcal_records_write_errors_total). Said once.",
                           self.path, exc, len(q))
            if self._fd is not None and self._partial == 0:
                os.close(self._fd)  # reopen next time: the folder may be created meanwhile
                self._fd = None
            return False
        return True

    def close(self) -> None:
        """Last try for queued records (an error names how many are lost), then close."""
        with self._lock:
            if self._queue and not self._write_queued():
                _log.error("mllmcal: %d record(s) could not be written to %s and are lost",
                           len(self._queue), self.path)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
