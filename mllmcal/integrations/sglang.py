"""SGLang integration: calibration statistics computed inside SGLang's scheduler.

:class:`CalibratedLogitProcessor` is an SGLang ``CustomLogitProcessor``, SGLang's
per-request processor API. Start the engine with ``--enable-custom-logit-processor``
(offline: ``sglang.Engine(..., enable_custom_logit_processor=True)``) and pass it per
request::

    from mllmcal.integrations.sglang import CalibratedLogitProcessor
    engine.generate(prompt, {"max_new_tokens": 32, "custom_params": {"mllmcal_id": "q1"}},
                    custom_logit_processor=CalibratedLogitProcessor.to_str())
    # over HTTP (/generate): "custom_logit_processor": CalibratedLogitProcessor.to_str(),
    #                         "sampling_params": {..., "custom_params": {"mllmcal_id": "q1"}}

``to_str()`` names the class (dill pickles it by reference), so the server's Python must
be able to import mllmcal. ``custom_params`` must be a dict (``{}`` will do): SGLang hands
the processor a weak reference to the request only inside it.

What it computes. Once per step, one fused :func:`mllmcal.token_stats` call on the
``[rows, V]`` fp32 logits of the requests that use it (after SGLang's penalties, bias and
grammar mask, before temperature and top-k/top-p), at the calibration temperature
``MLLMCAL_SGLANG_TEMPERATURE`` (default 1). The logits go back unchanged. Per generated
token the record has ``confidence``, ``entropy`` (nats) and ``logprob``: ``log(confidence)``
when the token is the argmax of those logits (always for greedy requests, which then equal
SGLang's own ``output_token_logprobs``); for other tokens ``null``, unless the request sets
``custom_params["mllmcal_logprobs"] = True``: then its rows are kept until its token is
known and the log-probability is exact.

Records and metrics are those of the vLLM integration, written by the same code
(:func:`mllmcal.integrations.vllm.records.request_record`, the ``mllmcal_*`` Prometheus
metrics of :mod:`mllmcal.integrations.vllm.metrics`): one JSON line per request, appended
to ``MLLMCAL_SGLANG_RECORDS`` (unset: none written). The record's ``id`` is
``custom_params["mllmcal_id"]``, else SGLang's request id (``meta_info["id"]``); ``finish``
is ``"length"``, ``"stop"`` (stop token or string), ``"removed"`` (aborted, or gone without
a reason seen) or ``"flush"`` (still running at :func:`flush` or exit).

When a record is written. SGLang's overlap scheduler runs one step ahead of the request's
bookkeeping, so a token's statistics are committed once the token appears in the request's
output, by a daemon thread every ``MLLMCAL_SGLANG_FLUSH_INTERVAL`` seconds (default 0.5);
a request is written exactly once, when that thread sees it finished (or gone). Only
tensor-parallel rank 0 writes. Not supported: speculative decoding (several rows per
request), requests retracted and re-run after they produced tokens.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
from typing import Any

import torch

from .._checks import check_scalar_temperature
from .vllm.config import env_flag
from .vllm.metrics import count_record, count_write_error, metrics, set_temperature
from .vllm.records import RecordWriter, request_record
from .vllm.steps import CONF, ENT, LSE, PRED, SavedLogits, StepStats, token_logprob
from .vllm.tracker import append_token, start_drain_thread

try:
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor as _Base
except ImportError:  # mllmcal without SGLang: the class exists, to_str() says what is missing

    class _Base:  # type: ignore[no-redef]
        @classmethod
        def to_str(cls) -> str:
            raise ImportError("CalibratedLogitProcessor.to_str() needs sglang installed")


__all__ = ["CalibratedLogitProcessor", "flush", "tracker"]

_log = logging.getLogger("mllmcal")


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


class _Request:
    """What the tracker knows about one SGLang request. Has the attributes
    :func:`~mllmcal.integrations.vllm.records.request_record` reads."""

    __slots__ = ("rid", "params", "req", "out", "max_new", "opt_logprobs", "n_calls",
                 "entries", "tokens", "confidence", "entropy", "logprob", "temperature",
                 "ended_by", "written")

    def __init__(self, params: dict[str, Any], req: Any) -> None:
        rid = params.get("mllmcal_id")
        self.rid = str(rid) if rid is not None else str(req.rid)
        self.params = params  # held, so id(params) stays this request's key
        self.req = req  # SGLang's weakref.proxy to its Req: ReferenceError once it is gone
        self.out = req.output_ids  # the live output list; kept, to read it after the Req died
        self.max_new = getattr(req.sampling_params, "max_new_tokens", None)
        self.opt_logprobs = bool(params.get("mllmcal_logprobs", False))
        self.n_calls = 0
        # (output index, step, row, kept logits row or None), appended by the scheduler
        self.entries: collections.deque[tuple[int, StepStats, int, torch.Tensor | None]] = (
            collections.deque())
        self.tokens: list[int] = []
        self.confidence: list[float | None] = []
        self.entropy: list[float | None] = []
        self.logprob: list[float | None] = []
        self.temperature = 1.0
        self.ended_by = ""
        self.written = False


def _finish_name(reason: Any) -> str:
    name = type(reason).__name__.upper()
    if "LENGTH" in name:
        return "length"
    if "ABORT" in name:
        return "removed"
    return "stop"


def _middle_chunk(req: Any) -> bool:
    """Whether this step prefills a chunk of ``req``'s prompt that is not the last one.

    The step's chunk ends at ``req.extend_end``; ``full_untruncated_fill_ids`` is the whole
    prompt plus output. (``inflight_middle_chunks`` is not usable: the overlap scheduler
    decrements it only after the next batch, the last chunk's, has run.)
    """
    end = getattr(req, "extend_end", None)
    fill = getattr(req, "full_untruncated_fill_ids", None)
    return end is not None and fill is not None and end < len(fill)


def _writer_rank() -> bool:
    """Every tensor-parallel rank samples the same logits: only rank 0 writes."""
    try:
        from sglang.srt.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # no distributed state (single process)
        return True


class SGLangTracker:
    """The requests of one SGLang scheduler process, from their first step to their record.

    The scheduler thread (:meth:`step`) only computes the statistics and appends to
    per-request deques; a daemon thread (:meth:`drain`) commits tokens, updates the
    metrics and writes records.
    """

    def __init__(self) -> None:
        try:  # the kernels' own check (fp32 range included), naming the variable
            self.temperature = check_scalar_temperature(
                _env_float("MLLMCAL_SGLANG_TEMPERATURE", 1.0))
        except ValueError as e:
            raise ValueError(f"MLLMCAL_SGLANG_TEMPERATURE: {e}") from None
        self.flush_interval = _env_float("MLLMCAL_SGLANG_FLUSH_INTERVAL", 0.5)
        writer = _writer_rank()
        use_metrics = env_flag("MLLMCAL_SGLANG_METRICS", True)
        self._metrics = metrics() if (writer and use_metrics) else None
        m = self._metrics
        self.records = RecordWriter((os.environ.get("MLLMCAL_SGLANG_RECORDS") or None)
                                    if writer else None, on_error=lambda: count_write_error(m))
        self._writer = writer
        self._lock = threading.RLock()
        self._reqs: dict[int, _Request] = {}  # id(custom params dict) -> request
        self._handed = 0  # records handed to the writer (it may still hold some)
        self._warned: set[str] = set()
        self._stop = threading.Event()
        set_temperature(self._metrics, self.temperature)
        start_drain_thread(self, self._stop, self.flush_interval, "SGLang")

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(msg)

    # ------------------------------------------------------------ scheduler thread

    def step(self, logits: torch.Tensor, params: list[dict[str, Any] | None]) -> None:
        """Statistics of one step's ``[rows, V]`` logits; ``params[i]`` is row i's
        ``custom_params`` with SGLang's ``"__req__"``."""
        if logits.shape[0] != len(params):
            self._warn_once("spec", "mllmcal: several rows per request (speculative "
                            "decoding) are not supported; statistics are skipped")
            return
        stats = StepStats.observe(logits, self.temperature)
        rows: list[tuple[_Request, int]] = []
        with self._lock:
            for i, p in enumerate(params):
                req = p.get("__req__") if isinstance(p, dict) else None
                if req is None:
                    self._warn_once("params", "mllmcal: a request without custom_params "
                                    "(a dict, {} will do) is not tracked")
                    continue
                st = self._reqs.get(id(p))
                if st is None or st.params is not p:
                    st = _Request(p, req)
                    self._reqs[id(p)] = st
                if st.written:  # the overlap scheduler's step after the request finished
                    continue
                if _middle_chunk(req):
                    continue  # a prompt chunk before the last: SGLang drops its token
                rows.append((st, i))
        kept = [i for st, i in rows if st.opt_logprobs]
        saved: dict[int, torch.Tensor] = {}
        if kept:
            # SGLang hands the processor a copy of the rows, but the chosen token is only
            # known a step or two later: keep the opted-in rows, nothing else.
            sel = SavedLogits.take(logits, kept).logits
            saved = {r: sel[j] for j, r in enumerate(kept)}
        stats.launch_copy()
        for st, i in rows:
            st.entries.append((st.n_calls, stats, i, saved.get(i)))
            st.n_calls += 1

    # ------------------------------------------------------------ drain thread

    def drain(self, final: bool = False) -> int:
        """Commit the tokens now known and write the records of finished requests (with
        ``final``, of every request). Returns the number of records written."""
        before = self.n_records
        with self._lock:
            self.records.retry()
            for key, st in list(self._reqs.items()):
                try:
                    done = st.req.finished()
                    reason = st.req.finished_reason if done else None
                    st.out = st.req.output_ids
                    alive = True
                except ReferenceError:  # SGLang dropped the request
                    done, reason, alive = True, None, False
                if st.written:
                    if not alive:
                        del self._reqs[key]
                    continue
                tokens = list(st.out)
                self._commit(st, tokens, wait=final or done)
                if done or final:
                    if reason is not None:
                        st.ended_by = _finish_name(reason)
                    elif not st.ended_by:  # gone before a drain saw its reason
                        st.ended_by = ("flush" if not done else "length"
                                       if st.max_new is not None and len(tokens) >= st.max_new
                                       else "removed")
                    self._write(st, tokens)
                    # A written request that is still alive stays, marked written: the
                    # overlap scheduler may run it one more step.
                    if final or not alive:
                        del self._reqs[key]
        return self.n_records - before

    def _commit(self, st: _Request, tokens: list[int], wait: bool) -> None:
        while st.entries:
            k, stats, row, kept = st.entries[0]
            if k >= len(tokens):
                if wait:  # a step whose token was never appended (overlap, abort)
                    st.entries.popleft()
                    continue
                return
            if not stats.ready():
                if not wait:
                    return
                stats.wait()
            st.entries.popleft()
            v = stats.values()
            conf, ent, lse, pred = v[CONF][row], v[ENT][row], v[LSE][row], int(v[PRED][row])
            tok = tokens[k]
            # The kept row is read (a device sync) only for a token that is not the argmax.
            logit = float(kept[tok]) if kept is not None and tok != pred else None
            if k == 0:
                st.temperature = stats.temperature
            append_token(st, conf, ent, token_logprob(tok, pred, conf, lse, logit,
                                                      stats.temperature), self._metrics)

    def _write(self, st: _Request, tokens: list[int]) -> None:
        """Hand ``st``'s record to the writer and mark it written."""
        st.entries.clear()
        st.tokens = tokens
        if self._writer:
            # The writer keeps a record it could not write and retries it at every drain
            # (vllm/records.py: at least once, at most once); it logs the first failure.
            self.records.write(request_record(st))
            self._handed += 1
            count_record(self._metrics)
        st.written = True

    @property
    def n_records(self) -> int:
        """Records whose lines are in the file (handed over, not waiting, not dropped)."""
        return self._handed - self.records.n_queued - self.records.n_dropped

    def close(self) -> None:
        """Write every open request's record (``finish`` ``"flush"`` unless finished)."""
        self._stop.set()
        self.drain(final=True)
        self.records.close()


_tracker: SGLangTracker | None = None
_tracker_lock = threading.Lock()


def tracker() -> SGLangTracker | None:
    """This process's tracker (None until a request used the processor here)."""
    return _tracker


def _get_tracker() -> SGLangTracker:
    global _tracker
    if _tracker is None:
        with _tracker_lock:
            if _tracker is None:
                _tracker = SGLangTracker()
                atexit.register(_tracker.close)
    return _tracker


def flush() -> int:
    """Commit and write now what is known in this process (the scheduler's); returns the
    number of records written."""
    return _tracker.drain() if _tracker is not None else 0


class CalibratedLogitProcessor(_Base):
    """SGLang ``CustomLogitProcessor`` that records calibration statistics (module docs).

    SGLang builds a new instance for every batch, so the state lives in the process's
    :class:`SGLangTracker`, not here.
    """

    def __call__(self, logits: torch.Tensor,
                 custom_param_list: list[dict[str, Any] | None] | None = None) -> torch.Tensor:
        """Observe ``logits`` (fp32 ``[rows, V]``, one row per request using this
        processor); returns them unchanged."""
        if custom_param_list and logits.shape[0]:
            _get_tracker().step(logits, custom_param_list)
        return logits
