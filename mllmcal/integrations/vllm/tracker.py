"""The runner-independent core of the vLLM integration: the life of each request, from
the step that first sees it to its record.

Nothing here imports vLLM, so it can be unit-tested without it. The processors in
:mod:`.v1` and :mod:`.v2` feed it per-step statistics; the :class:`Tracker` turns them
into per-token values once the token each row produced is known, and hands finished
requests to :mod:`.records` (their JSON line), :mod:`.metrics` and :mod:`.feedback`.

Threads. The engine thread only appends to per-request deques, to ``_ended`` and to the
runners' step queues (thread-safe appends in CPython) and swaps a few references under
``_lock``; all the work that costs Python time per token (reading step values back,
committing tokens, histograms, records, feedback) happens in :meth:`Tracker.drain`,
which a daemon thread runs every ``flush_interval`` seconds (and :meth:`Tracker.flush`
runs on demand and at exit). The daemon thread is what makes metrics and records appear
while a server is idle: an idle engine makes no more steps, so nothing in the engine
thread would run.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .channel import Publisher
from .config import Config
from .feedback_scorer import AwaitingAnswer, FeedbackScorer
from .metrics import count_record, count_write_error, metrics, observe_token, set_temperature
from .records import RecordWriter, request_record
from .request import Request
from .steps import StepStats, nan_to_none

__all__ = ["Tracker", "append_token", "live_trackers", "start_drain_thread"]

_log = logging.getLogger("mllmcal")

_trackers: weakref.WeakSet[Tracker] = weakref.WeakSet()
_KEYED_INTERVAL = 0.01  # seconds between drains while requests publish their values


def live_trackers() -> list[Tracker]:
    """The live trackers of this process (one per active processor), closed ones left out."""
    return [t for t in _trackers if not t._closed]


def _flush_all_at_exit() -> None:
    for t in live_trackers():
        try:
            t.close()
        except Exception:  # at exit: report, never raise
            _log.exception("mllmcal: flushing vLLM records at exit failed")


atexit.register(_flush_all_at_exit)


def append_token(req: Any, conf: float, ent: float, logprob: float | None,
                 metrics: Any) -> None:
    """Append one token's values to ``req``'s record lists (NaN as None) and count it in
    ``metrics`` (:func:`.metrics.metrics`, or None)."""
    req.confidence.append(nan_to_none(conf))
    req.entropy.append(nan_to_none(ent))
    req.logprob.append(nan_to_none(logprob))
    observe_token(metrics, conf, ent)


def _yield_to_the_engine() -> None:
    # The calling (drain) thread gets the lowest CPU priority (Linux: threads are tasks with
    # their own nice value). Where cores are few, a drain that preempts one of the forward
    # pass's OpenMP workers stalls the whole parallel region until that worker runs again,
    # costing the engine more than the drain's own CPU time; at nice 19 the workers win.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: keep the default
        pass


def start_drain_thread(owner: Any, stop: threading.Event, interval: float, engine: str,
                       hurry: Callable[[Any], bool] | None = None) -> threading.Thread:
    """Start the daemon thread that calls ``owner.drain()`` every ``interval`` seconds
    (sooner, :data:`_KEYED_INTERVAL`, while ``hurry(owner)``: someone waits for values)
    until ``stop`` is set or ``owner`` is garbage-collected (it holds a weak reference).
    A failing drain is logged, naming ``engine``, and retried at the next tick."""
    ref = weakref.ref(owner)

    def loop() -> None:
        _yield_to_the_engine()
        wait = interval
        while not stop.wait(wait):
            t = ref()
            if t is None:
                return
            try:
                t.drain()
            except Exception:  # keep serving; the next drain retries
                _log.exception("mllmcal: draining %s statistics failed", engine)
            wait = min(interval, _KEYED_INTERVAL) if hurry is not None and hurry(t) else interval
            del t

    thread = threading.Thread(target=loop, name=f"mllmcal-{engine.lower()}-drain", daemon=True)
    thread.start()
    return thread


class Tracker:
    """Per-engine request bookkeeping shared by the V1 and V2 runners.

    Runner subclasses push :class:`~.steps.StepStats` and per-request entries, and
    implement :meth:`_commit_ready` (turn ready entries of one request into per-token
    values through :meth:`_commit`).
    """

    def __init__(self, config: Config, *, writer_rank: bool = True) -> None:
        self.config = config
        self.temperature = config.temperature  # read by the runners at every step
        self._lock = threading.RLock()  # request bookkeeping, shared with the engine thread
        self._active: set[Request] = set()
        self._keyed: set[Request] = set()  # active requests that publish their values
        self._publisher: Publisher | None = None
        self._outbox: list[dict[str, Any]] = []  # messages to send once the lock is released
        self._detached: dict[Any, tuple[Request, float]] = {}
        self._ended: collections.deque[Request] = collections.deque()
        self._writer = writer_rank
        self._metrics = metrics() if (config.metrics and writer_rank) else None
        m = self._metrics
        self.records = RecordWriter(config.records if writer_rank else None,
                                    on_error=lambda: count_write_error(m))
        self.scorer = FeedbackScorer(
            config.n_bins, config.max_awaiting_feedback, config.temperature,
            online=config.online_temperature, path=config.feedback, metrics=self._metrics)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.n_records = 0
        set_temperature(self._metrics, self.temperature)
        _trackers.add(self)

    @property
    def state(self) -> Any:
        """The :class:`mllmcal.CalibrationState` the feedback feeds."""
        return self.scorer.book.state

    @property
    def n_feedback(self) -> int:
        """Feedback items applied so far."""
        return self.scorer.book.n_feedback

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the drain thread (idempotent)."""
        if self._thread is None and not self._closed:
            self._thread = start_drain_thread(
                self, self._stop, self.config.flush_interval, "vLLM",
                hurry=lambda t: bool(t._keyed))

    def close(self) -> None:
        """Write the records of every request still open, then stop the drain thread."""
        if self._closed:
            return
        self.flush(end_active=True)
        self._closed = True
        self._stop.set()
        self.records.close()

    # ---------------------------------------------------------------- engine-thread API

    def open_request(self, req: Request) -> None:
        self._active.add(req)
        if req.reply_key is not None and self._writer:
            self._keyed.add(req)

    def detach(self, key: Any, req: Request) -> None:
        """``req`` left the batch without being known to be finished: vLLM also takes out
        requests it did not schedule this step (and preempted ones) and puts them back
        later. It is ended when its tokens show it finished, when it is not back within
        ``detach_timeout`` seconds, or at shutdown."""
        if not req.ended:
            self._detached[key] = (req, time.monotonic())

    def reattach(self, key: Any) -> Request | None:
        found = self._detached.pop(key, None)
        return found[0] if found is not None and not found[0].ended else None

    def end_request(self, req: Request, why: str) -> None:
        """The engine says ``req`` left its slot; its record is written once complete."""
        if not req.ended:
            req.ended, req.ended_by = True, why
            self._ended.append(req)

    # ---------------------------------------------------------------- drain

    def flush(self, *, end_active: bool = False) -> int:
        """Drain now; with ``end_active``, also close every open request (its record is
        written with the tokens known so far). Returns the number of records written."""
        with self._lock:
            before = self.n_records
            if end_active:
                # Only when the engine is done: mid-step, the rows of the step in flight
                # would be taken as having produced nothing.
                self._before_final()
            self.drain()
            if end_active:
                for req in list(self._active):
                    self.end_request(req, "flush")
                self.drain(final=True)
            return self.n_records - before

    def _before_final(self) -> None:
        """Runner hook: finish device-side work that normally waits for the next step."""

    def _before_drain(self) -> None:
        """Runner hook: work of the drain thread before it commits tokens."""

    def drain(self, final: bool = False) -> None:
        with self._lock:
            self._drain_requests(final)
            self.records.retry()
            msgs, self._outbox = self._outbox, []
        if msgs:
            # Outside the lock the engine thread shares: a slow reader must not stall it.
            if self._publisher is None:
                self._publisher = Publisher()
            self._publisher.send(msgs)
        # Feedback outside the engine's lock: scoring a kept row reads results back to the
        # host (a device sync), which must not hold up the engine thread.
        self.scorer.drain()
        self.temperature = self.scorer.temperature

    def _drain_requests(self, final: bool) -> None:
        self._before_drain()
        now = time.monotonic()
        for key, (req, since) in list(self._detached.items()):
            if req.ended or final:
                del self._detached[key]
            elif now - since > self.config.detach_timeout:
                del self._detached[key]
                self.end_request(req, "removed")
        for req in list(self._active):
            self._commit_ready(req, final=False)
            if not req.ended:
                why = req.finished_by_tokens()
                if why:
                    self.end_request(req, why)
        for _ in range(len(self._ended)):
            req = self._ended.popleft()
            self._commit_ready(req, final=final)
            if req.entries and not final:
                self._ended.append(req)  # its last step is not readable yet
                continue
            self._finish(req)
        if self._keyed:
            self._publish([req for req in self._keyed if len(req.confidence) > req.n_sent])

    def _publish(self, reqs: list[Request], finish: str | None = None) -> None:
        """Queue the values ``reqs`` committed since their last message (see .channel); the
        drain sends them."""
        msgs = self._outbox
        for req in reqs:
            a, b = req.n_sent, len(req.confidence)
            msgs.append({"key": req.reply_key, "sub": id(req), "id": req.rid, "start": a,
                         "token_ids": [int(t) for t in req.tokens[a:b]],
                         "confidence": req.confidence[a:b], "entropy": req.entropy[a:b],
                         "logprob": req.logprob[a:b], "temperature": req.temperature,
                         "finish": finish})
            req.n_sent = b

    def _commit_ready(self, req: Request, final: bool) -> None:
        raise NotImplementedError

    def _commit(self, req: Request, k: int, conf: float, ent: float, logprob: float | None,
                step: StepStats, temperature: float) -> None:
        """Record the statistics of output token ``k`` of ``req``, computed in ``step``."""
        if k != len(req.confidence):
            # Tokens commit in order; a gap means a step's values were lost (cannot happen
            # with the engine's own bookkeeping). Fill with nulls rather than misalign.
            _log.warning("mllmcal: request %s token %d committed out of order", req.rid, k)
            for values in (req.confidence, req.entropy, req.logprob):
                values.extend([None] * (k - len(values)))
            if k < len(req.confidence):
                return
        append_token(req, conf, ent, logprob, self._metrics)
        if k == req.fb_position:
            req.temperature = temperature
            if req.keep_row:
                req.fb_row = req.fb_rows.pop(id(step), None)
                req.fb_rows.clear()

    def _finish(self, req: Request) -> None:
        self._active.discard(req)
        req.entries.clear()
        if req.written:
            return
        req.written = True
        if req in self._keyed:
            self._keyed.discard(req)
            self._publish([req], finish=req.ended_by)
        if self._writer:
            self.records.write(request_record(req))
            self.n_records += 1
            count_record(self._metrics)
        p = req.fb_position
        if len(req.confidence) > p:
            self.scorer.await_answer(req.rid, AwaitingAnswer(
                int(req.tokens[p]), req.confidence[p], req.temperature, req.fb_row))
            req.fb_row = None
        req.fb_rows.clear()
