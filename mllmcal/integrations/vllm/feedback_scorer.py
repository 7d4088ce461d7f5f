"""Correctness feedback for the vLLM integration: what arrives (:class:`FeedbackItem`),
from where (:func:`feedback` in the same process, :class:`FeedbackFile` from any), and how
each engine's :class:`FeedbackScorer` scores it against the answer waiting in its
:class:`~mllmcal.integrations._feedback.FeedbackBook` (the ``transformers`` processor's
book too)."""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...calibration import OnlineTemperature
from .._feedback import FeedbackBook
from .metrics import count_feedback

__all__ = ["AwaitingAnswer", "FeedbackFile", "FeedbackItem", "FeedbackScorer", "feedback",
           "parse_feedback"]

_log = logging.getLogger("mllmcal")


@dataclass(frozen=True)
class FeedbackItem:
    """One verdict: request ``id`` (its ``mllmcal_id``), and ``correct`` and/or ``label``
    (the right token id at the feedback position)."""

    id: str
    correct: bool | None = None
    label: int | None = None


@dataclass(frozen=True)
class AwaitingAnswer:
    """What feedback on a finished request needs, and no more of the request.

    Attributes:
        token: the token generated at the feedback position.
        confidence: its confidence (None if its statistics were lost).
        temperature: the calibration temperature its statistics were computed at.
        row: its ``[V]`` logits row, for requests that asked to keep it (else None).
    """

    token: int
    confidence: float | None
    temperature: float
    row: torch.Tensor | None


def parse_feedback(d: Mapping[str, Any]) -> FeedbackItem:
    """Validate one feedback object (a JSON line's or :func:`feedback`'s fields)."""
    if "id" not in d or d["id"] is None:
        raise ValueError(f"feedback needs an 'id' (the request's mllmcal_id), got {dict(d)!r}")
    correct, label = d.get("correct"), d.get("label")
    if correct is None and label is None:
        raise ValueError(f"feedback for {d['id']!r} needs 'correct' or 'label'")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        raise ValueError(f"feedback label must be a token id (int >= 0), got {label!r}")
    if correct is not None and not isinstance(correct, bool):
        raise ValueError(f"feedback 'correct' must be a bool, got {correct!r}")
    return FeedbackItem(str(d["id"]), correct, label)


# Every engine's scorer in this process, and feedback given before any engine existed.
_scorers: weakref.WeakSet[FeedbackScorer] = weakref.WeakSet()
_early_queue: collections.deque[FeedbackItem] = collections.deque()


def feedback(request_id: str, *, correct: bool | None = None, label: int | None = None) -> None:
    """Report whether request ``request_id``'s answer was right (in-process engines).

    Args:
        request_id: the ``mllmcal_id`` the request was sent with.
        correct: whether the answer token (see ``mllmcal_feedback_position``) was right.
        label: the token id that was right at that position. With a label, ``correct`` is
            ``label == generated token``, and the temperature can be updated (it needs the
            right token's logit, from the row the processor kept for a request that set
            ``extra_args["mllmcal_feedback"] = True``).

    Feedback is queued and applied by every processor in this process at its next drain.
    For an engine in another process (the default ``LLM`` and the API server), append the
    same fields as a JSON line to the file named by ``MLLMCAL_VLLM_FEEDBACK`` instead.
    """
    item = parse_feedback({"id": request_id, "correct": correct, "label": label})
    scorers = list(_scorers)
    if not scorers:
        _early_queue.append(item)  # adopted by the first engine created in this process
    for s in scorers:
        s.inbox.append(item)


class FeedbackFile:
    """Reads the lines appended to a JSON-lines feedback file since the last read.

    A line is consumed once its newline is there: a last line without one is left for a
    later read (so a writer may append a line in several writes, but must end it with a
    newline). The file may be truncated (``> feedback.jsonl``) or rotated (moved away and
    recreated): when its inode changed, it is shorter than what was read, or the bytes read
    so far no longer end where they did, it is read again from its start (a warning says
    so once).
    """

    _HEAD = 64  # bytes of the file's start remembered to recognise a rewritten file

    def __init__(self, path: str) -> None:
        self.path = path
        self._pos = 0
        self._ino: int | None = None
        self._head = b""
        self._warned = False

    def _restarted(self, f: Any, st: os.stat_result) -> bool:
        if (self._ino is not None and st.st_ino != self._ino) or st.st_size < self._pos:
            return True
        if self._pos:
            # Truncated and refilled past the old offset between two reads: the first
            # bytes or the newline before the offset differ.
            f.seek(0)
            head = f.read(len(self._head))
            f.seek(self._pos - 1)
            return head != self._head or f.read(1) != b"\n"
        return False

    def read_new(self) -> list[FeedbackItem]:
        """The complete new lines' items; a half-written last line is read next time, a bad
        line is logged and skipped."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except OSError:
            return []
        with f:
            st = os.fstat(f.fileno())
            if self._restarted(f, st):
                if not self._warned:
                    self._warned = True
                    _log.warning("mllmcal: feedback file %s was truncated or replaced; "
                                 "reading it again from its start. Said once.", self.path)
                self._pos, self._head = 0, b""
            self._ino = st.st_ino
            if st.st_size <= self._pos:
                return []
            f.seek(self._pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        if self._pos == 0 and end:
            self._head = data[:min(end, self._HEAD)]
        self._pos += end
        items = []
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                items.append(parse_feedback(json.loads(line)))
            except (ValueError, TypeError) as exc:
                _log.warning("mllmcal: bad feedback line %r in %s: %s", line[:200], self.path, exc)
        return items


class FeedbackScorer:
    """One engine's feedback: answers awaiting it, feedback awaiting its answer, and the
    calibration state and online temperature it moves.

    Args:
        n_bins: bins of the calibration state.
        max_awaiting: answers (and early feedback items) kept; the oldest go first.
        temperature: the calibration temperature to start from.
        online: take a Newton step of :class:`mllmcal.OnlineTemperature` per labelled item
            whose answer row was kept.
        path: the feedback file to tail, if any.
        metrics: the process's metrics (None: off).
    """

    def __init__(self, n_bins: int, max_awaiting: int, temperature: float, *, online: bool,
                 path: str | None, metrics: dict[str, Any] | None) -> None:
        # On the CPU whatever the engine's device: feedback is rare, and mixing labelled
        # items (kept device rows) with correctness-only ones needs one place for the state.
        self.book: FeedbackBook[AwaitingAnswer] = FeedbackBook(n_bins, max_awaiting, device="cpu")
        self.temperature = temperature
        self.online = OnlineTemperature(temperature) if online else None
        self.file = FeedbackFile(path) if path else None
        self.inbox: collections.deque[FeedbackItem] = collections.deque()
        self.lock = threading.RLock()  # the book and the state; drain side only
        self._early: collections.OrderedDict[str, FeedbackItem] = collections.OrderedDict()
        self._metrics = metrics
        self._warned_shared_id = False
        while _early_queue:
            self.inbox.append(_early_queue.popleft())
        _scorers.add(self)

    def await_answer(self, rid: str, answer: AwaitingAnswer) -> None:
        """A request finished: keep what its feedback needs, and apply feedback that came
        before it (at the next :meth:`drain`)."""
        with self.lock:
            if self.book.put(rid, answer) and not self._warned_shared_id:
                # n > 1 (the samples share the parent's extra_args) or an id reused
                # before its feedback came: feedback by id can only reach one of them.
                self._warned_shared_id = True
                _log.warning("mllmcal: request id %r finished again while awaiting "
                             "feedback (n > 1, or an id reused); feedback by this id goes "
                             "to the request that finished last. Said once.", rid)
            self.book.trim()
            early = self._early.pop(rid, None)
        if early is not None:
            self.inbox.append(early)

    def drain(self) -> None:
        """Apply the queued feedback, then the feedback file's new lines."""
        with self.lock:
            while self.inbox:
                self.apply(self.inbox.popleft())
            if self.file is not None:
                for item in self.file.read_new():
                    self.apply(item)

    def apply(self, item: FeedbackItem) -> bool:
        """Score ``item`` against its waiting answer; False (kept for later) if none waits."""
        found = self.book.take(item.id)
        if found is None:
            self._early[item.id] = item
            while len(self._early) > self.book.max_pending:
                self._early.popitem(last=False)
            return False
        label, row = item.label, found.row
        correct = (label == found.token) if label is not None else bool(item.correct)
        if label is not None and row is not None and label < row.shape[-1]:
            # The right token's logit is known: score the kept row exactly at the
            # temperature the request was served with (histogram, NLL, Brier), then let the
            # online estimator take its Newton step on it (one host sync, this thread).
            row = row.cpu()
            self.book.score_logits(row, label, found.temperature)
            if self.online is not None:
                self.online.update(row[None], torch.tensor([label]))
                self.temperature = self.online.temperature
        elif found.confidence is not None:
            self.book.score(torch.tensor([found.confidence]), torch.tensor([correct]))
        else:
            return True
        count_feedback(self._metrics, self.book.state, self.temperature)
        return True
