"""Runner-independent part of the vLLM integration: per-request bookkeeping, records,
Prometheus metrics, correctness feedback and online temperature.

Nothing here imports vLLM, so it can be unit-tested without it. The processors in
:mod:`mllmcal.integrations.vllm.processor` feed it per-step statistics; this module turns
them into per-token values once the token each row produced is known, writes one JSON line
per finished request and keeps the metrics.

Threads. The engine thread only appends to per-request deques and to ``_ended`` (both
thread-safe appends in CPython) and swaps a few references under ``_lock``; all the work that
costs Python time per token (reading step values back, committing tokens, histograms,
records, feedback) happens in :meth:`Tracker.drain`, which a daemon thread runs every
``flush_interval`` seconds (and :meth:`Tracker.flush` runs on demand and at exit). The
daemon thread is what makes metrics and records appear while a server is idle: an idle
engine makes no more steps, so nothing in the engine thread would run.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...calibration import CalibrationState, OnlineTemperature
from ...ops import check_scalar_temperature

__all__ = ["Config", "Tracker", "Request", "StepStats", "feedback", "metrics"]

_log = logging.getLogger("mllmcal")

# Rows of a StepStats host array.
CONF, ENT, LSE, PRED = range(4)

# Buckets of the Prometheus histograms. Confidence lives in [0, 1]; entropy in nats in
# [0, log V] (log 32000 ≈ 10.4, log 262144 ≈ 12.5).
CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    v = v.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0/1/true/false, got {os.environ[name]!r}")


@dataclass
class Config:
    """Settings of the processors in one engine.

    Read from the environment of the engine's worker process (``MLLMCAL_VLLM_*``), then
    overridden by ``additional_config={"mllmcal": {...}}`` of the vLLM engine (keys are the
    field names below). See the package docstring for each one.
    """

    records: str | None = None
    temperature: float = 1.0
    online_temperature: bool = False
    feedback: str | None = None
    n_bins: int = 15
    metrics: bool = True
    flush_interval: float = 0.5
    enabled: bool = True
    max_awaiting_feedback: int = 1000
    detach_timeout: float = 60.0
    apply_temperature: bool = False

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None) -> Config:
        env = os.environ
        cfg = cls(
            records=env.get("MLLMCAL_VLLM_RECORDS") or None,
            temperature=float(env.get("MLLMCAL_VLLM_TEMPERATURE", "1.0")),
            online_temperature=_env_flag("MLLMCAL_VLLM_ONLINE_TEMPERATURE", False),
            feedback=env.get("MLLMCAL_VLLM_FEEDBACK") or None,
            n_bins=int(env.get("MLLMCAL_VLLM_N_BINS", "15")),
            metrics=_env_flag("MLLMCAL_VLLM_METRICS", True),
            flush_interval=float(env.get("MLLMCAL_VLLM_FLUSH_INTERVAL", "0.5")),
            enabled=not _env_flag("MLLMCAL_VLLM_DISABLE", False),
            detach_timeout=float(env.get("MLLMCAL_VLLM_DETACH_TIMEOUT", "60")),
            apply_temperature=_env_flag("MLLMCAL_VLLM_APPLY_TEMPERATURE", False),
        )
        if overrides:
            unknown = set(overrides) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"unknown mllmcal settings {sorted(unknown)} in additional_config; "
                    f"known: {sorted(cls.__dataclass_fields__)}"
                )
            for k, v in overrides.items():
                setattr(cfg, k, v)
        cfg.temperature = check_scalar_temperature(cfg.temperature)
        if not cfg.flush_interval > 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {cfg.flush_interval}")
        return cfg


# --------------------------------------------------------------------------- metrics

_metrics_lock = threading.Lock()
_metrics: dict[str, Any] | None = None


def metrics() -> dict[str, Any] | None:
    """The process's ``mllmcal_*`` Prometheus metrics, created on first use (None without
    ``prometheus_client``).

    They are created once per process: prometheus_client refuses a second metric of the
    same name in a registry, and in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set
    before the process started) every process writes its own files that the API server's
    ``/metrics`` sums. Gauges use ``multiprocess_mode="mostrecent"``: the last value set by
    any process is shown, not a sum.
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
            _metrics = {
                "confidence": Histogram(
                    "mllmcal_token_confidence",
                    "Confidence (max probability at the calibration temperature) of each "
                    "generated token",
                    buckets=CONFIDENCE_BUCKETS,
                ),
                "entropy": Histogram(
                    "mllmcal_token_entropy",
                    "Entropy in nats of the full next-token distribution of each generated "
                    "token",
                    buckets=ENTROPY_BUCKETS,
                ),
                "requests": Counter(
                    "mllmcal_requests", "Requests whose mllmcal record was completed"
                ),
                "feedback": Counter(
                    "mllmcal_feedback", "Correctness feedback items applied"
                ),
                "ece": Gauge(
                    "mllmcal_ece", "Expected calibration error (L1) of the feedback so far",
                    multiprocess_mode="mostrecent",
                ),
                "accuracy": Gauge(
                    "mllmcal_accuracy", "Accuracy of the feedback so far",
                    multiprocess_mode="mostrecent",
                ),
                "temperature": Gauge(
                    "mllmcal_temperature", "Temperature used for the statistics",
                    multiprocess_mode="mostrecent",
                ),
            }
        return _metrics or None


# --------------------------------------------------------------------------- feedback

_feedback_queue: collections.deque[dict[str, Any]] = collections.deque()


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
    item = _feedback_item({"id": request_id, "correct": correct, "label": label})
    trackers = list(_trackers)
    if not trackers:
        _feedback_queue.append(item)  # adopted by the first engine created in this process
    for t in trackers:
        t._inbox.append(item)


def _feedback_item(d: Mapping[str, Any]) -> dict[str, Any]:
    if "id" not in d or d["id"] is None:
        raise ValueError(f"feedback needs an 'id' (the request's mllmcal_id), got {dict(d)!r}")
    correct, label = d.get("correct"), d.get("label")
    if correct is None and label is None:
        raise ValueError(f"feedback for {d['id']!r} needs 'correct' or 'label'")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        raise ValueError(f"feedback label must be a token id (int >= 0), got {label!r}")
    if correct is not None and not isinstance(correct, bool):
        raise ValueError(f"feedback 'correct' must be a bool, got {correct!r}")
    return {"id": str(d["id"]), "correct": correct, "label": label}


# --------------------------------------------------------------------------- steps

class StepStats:
    """The ``[B]`` statistics of one step, read back to the host without blocking.

    On a CUDA device the values are copied into pinned memory with ``non_blocking=True``
    and an event is recorded; :meth:`ready` polls the event, so the reader never waits. On
    the CPU the values are the tensors themselves.
    """

    __slots__ = ("_dev", "_host", "_event", "_lists", "saved", "saved_rows", "chosen",
                 "extra")

    def __init__(self, rows: Iterable[torch.Tensor], *, defer: bool = False) -> None:
        self._dev = torch.stack([r.to(torch.float32) for r in rows])
        self._host: torch.Tensor | None = None
        self._event = None
        self._lists: list[list[float]] | None = None
        # Opt-in rows kept until the chosen token is known: [b, V] and row -> index in it.
        self.saved: torch.Tensor | None = None
        self.saved_rows: dict[int, int] = {}
        # row -> (StepStats holding the chosen token's logit, its index there)
        self.chosen: dict[int, tuple[StepStats, int]] = {}
        self.extra: Any = None
        if not defer:
            self.launch_copy()

    def append_rows(self, rows: Iterable[torch.Tensor]) -> None:
        """Add rows before :meth:`launch_copy` (values computed a step later, on device)."""
        self._dev = torch.cat([self._dev, torch.stack([r.to(torch.float32) for r in rows])])

    def launch_copy(self) -> None:
        if self._dev.device.type == "cuda":
            self._host = torch.empty(self._dev.shape, dtype=torch.float32, pin_memory=True)
            self._host.copy_(self._dev, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = self._dev

    def ready(self) -> bool:
        if self._lists is not None:
            return True
        return self._host is not None and (self._event is None or self._event.query())

    def wait(self) -> None:
        """Block until the host copy is complete (shutdown only)."""
        if self._event is not None and self._lists is None:
            self._event.synchronize()

    def values(self) -> list[list[float]]:
        """Host values as ``[n_rows_of_stats][B]`` Python floats (call when :meth:`ready`)."""
        if self._lists is None:
            self._lists = self._host.tolist()
            self._dev = self._host = None
        return self._lists


# --------------------------------------------------------------------------- requests

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below it a request is sampled greedily
_ids = itertools.count()


class Request:
    """What the tracker knows about one request, and its per-token values so far."""

    __slots__ = ("rid", "max_tokens", "min_tokens", "stop_ids", "opt_logprobs", "needs_rows",
                 "keep_row", "fb_position", "tokens", "entries", "confidence", "entropy",
                 "logprob", "fb_row", "fb_rows", "ended", "ended_by", "written", "n_known",
                 "temperature", "key", "greedy_plain", "scale", "__weakref__")

    def __init__(self, params: Any, tokens: list[int] | None = None,
                 apply_temperature: bool = False) -> None:
        extra = getattr(params, "extra_args", None) or {}
        rid = extra.get("mllmcal_id")
        self.rid = str(rid) if rid is not None else f"mllmcal-{uuid.uuid4().hex[:12]}-{next(_ids)}"
        self.max_tokens = getattr(params, "max_tokens", None)
        self.min_tokens = getattr(params, "min_tokens", 0) or 0
        if getattr(params, "ignore_eos", False):
            stop = set(getattr(params, "stop_token_ids", None) or ())
        else:
            stop = set(getattr(params, "all_stop_token_ids", None) or ()) | set(
                getattr(params, "stop_token_ids", None) or ()
            )
        self.stop_ids = frozenset(stop)
        self.opt_logprobs = bool(extra.get("mllmcal_logprobs", False))
        greedy = (getattr(params, "temperature", 1.0) or 0.0) < _GREEDY_EPS
        no_penalties = (
            getattr(params, "repetition_penalty", 1.0) == 1.0
            and getattr(params, "frequency_penalty", 0.0) == 0.0
            and getattr(params, "presence_penalty", 0.0) == 0.0
        )
        # Greedy without penalties picks the argmax of the logits the processor sees, whose
        # log-probability is log(confidence): no row needs to be kept.
        self.greedy_plain = greedy and no_penalties
        self.needs_rows = self.opt_logprobs and not self.greedy_plain
        self.keep_row = bool(extra.get("mllmcal_feedback", False))
        # Sample from softmax(logits / (T_cal * T_sampling)): the processor divides the row
        # by the calibration temperature in place. Greedy choices do not change.
        self.scale = bool(extra.get("mllmcal_apply_temperature", apply_temperature))
        self.fb_position = int(extra.get("mllmcal_feedback_position", 0))
        # V1: vLLM's live output-token list; V2: filled by the tracker as tokens commit.
        self.tokens: list[int] = tokens if tokens is not None else []
        self.entries: collections.deque = collections.deque()
        self.confidence: list[float | None] = []
        self.entropy: list[float | None] = []
        self.logprob: list[float | None] = []
        self.fb_row: torch.Tensor | None = None
        self.fb_rows: dict[int, torch.Tensor] = {}
        self.ended = False
        self.ended_by = ""
        self.written = False
        self.n_known = 0
        self.temperature = 1.0
        self.key: Any = None  # what the runner recognises the request by when it returns

    def finished_by_tokens(self) -> str:
        """'length' or 'stop' when the committed tokens alone show the request is over."""
        n = len(self.confidence)
        if self.max_tokens is not None and n >= self.max_tokens:
            return "length"
        if n and n >= self.min_tokens and self.tokens[n - 1] in self.stop_ids:
            return "stop"
        return ""


def _num(x: float) -> float | None:
    return None if (x is None or math.isnan(x)) else x


# --------------------------------------------------------------------------- tracker

_trackers: weakref.WeakSet = weakref.WeakSet()


def _flush_all_at_exit() -> None:
    for t in list(_trackers):
        try:
            t.close()
        except Exception:  # at exit: report, never raise
            _log.exception("mllmcal: flushing vLLM records at exit failed")


atexit.register(_flush_all_at_exit)


class Tracker:
    """Per-engine state shared by the V1 and V2 processors.

    Subclasses (the processors) call :meth:`start`, push :class:`StepStats` and token
    entries, and implement :meth:`_commit_ready` (turn ready entries of one request into
    per-token values).
    """

    def __init__(self, config: Config, *, writer_rank: bool = True) -> None:
        self.config = config
        self.temperature = config.temperature
        self.online = OnlineTemperature(config.temperature) if config.online_temperature else None
        # On the CPU whatever the engine's device: feedback is rare, and mixing labelled
        # items (kept device rows) with correctness-only ones needs one place for the state.
        self.state = CalibrationState(n_bins=config.n_bins, device="cpu")
        self._lock = threading.RLock()      # request bookkeeping, shared with the engine thread
        self._fb_lock = threading.RLock()   # feedback state, drain side only
        self._active: set[Request] = set()
        self._detached: dict[Any, tuple[Request, float]] = {}
        self._ended: collections.deque[Request] = collections.deque()
        # id -> (answer token, its confidence, temperature, kept row or None): only what
        # feedback needs, not the request.
        self._warned_shared_id = False
        self._awaiting: collections.OrderedDict[str, tuple[int, Any, float, Any]] = (
            collections.OrderedDict()
        )
        self._early_feedback: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._feedback_pos = 0
        self._inbox: collections.deque[dict[str, Any]] = collections.deque()
        while _feedback_queue:
            self._inbox.append(_feedback_queue.popleft())
        self._records_file = None
        self._writer = writer_rank
        self._metrics = metrics() if (config.metrics and writer_rank) else None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.n_records = 0
        self.n_feedback = 0
        if self._metrics:
            self._metrics["temperature"].set(self.temperature)
        _trackers.add(self)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the drain thread (idempotent)."""
        if self._thread is None and not self._closed:
            ref = weakref.ref(self)
            stop, interval = self._stop, self.config.flush_interval

            def loop() -> None:
                while not stop.wait(interval):
                    t = ref()
                    if t is None:
                        return
                    try:
                        t.drain()
                    except Exception:  # keep serving; the next drain retries
                        _log.exception("mllmcal: draining vLLM statistics failed")
                    del t

            self._thread = threading.Thread(target=loop, name="mllmcal-vllm-drain", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Write the records of every request still open, then stop the drain thread."""
        if self._closed:
            return
        self.flush(end_active=True)
        self._closed = True
        self._stop.set()
        if self._records_file is not None:
            self._records_file.close()
            self._records_file = None

    # ---------------------------------------------------------------- engine-thread API

    def open_request(self, req: Request) -> None:
        self._active.add(req)

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
        # Feedback outside the engine's lock: scoring a kept row reads results back to the
        # host (a device sync), which must not hold up the engine thread.
        with self._fb_lock:
            self._read_feedback()

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

    def _commit_ready(self, req: Request, final: bool) -> None:
        raise NotImplementedError

    def _commit(self, req: Request, k: int, conf: float, ent: float, logprob: float | None,
                step: StepStats, temperature: float) -> None:
        """Record the statistics of output token ``k`` of ``req``, computed in ``step``."""
        if k != len(req.confidence):
            # Tokens commit in order; a gap means a step's values were lost (cannot happen
            # with the engine's own bookkeeping). Fill with nulls rather than misalign.
            _log.warning("mllmcal: request %s token %d committed out of order", req.rid, k)
            while len(req.confidence) < k:
                req.confidence.append(None)
                req.entropy.append(None)
                req.logprob.append(None)
            if k < len(req.confidence):
                return
        req.confidence.append(_num(conf))
        req.entropy.append(_num(ent))
        req.logprob.append(_num(logprob) if logprob is not None else None)
        if k == req.fb_position:
            req.temperature = temperature
            if req.keep_row:
                req.fb_row = req.fb_rows.pop(id(step), None)
                req.fb_rows.clear()
        m = self._metrics
        if m and not math.isnan(conf):
            m["confidence"].observe(conf)
            m["entropy"].observe(ent)

    def _finish(self, req: Request) -> None:
        self._active.discard(req)
        req.entries.clear()
        if req.written:
            return
        req.written = True
        n = len(req.confidence)
        lps = req.logprob
        exact = n > 0 and all(lp is not None for lp in lps)
        record = {
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
        }
        if self._writer:
            self._write(record)
            self.n_records += 1
            if self._metrics:
                self._metrics["requests"].inc()
        if n > req.fb_position:
            p = req.fb_position
            with self._fb_lock:
                if req.rid in self._awaiting and not self._warned_shared_id:
                    # n > 1 (the samples share the parent's extra_args) or an id reused
                    # before its feedback came: feedback by id can only reach one of them.
                    self._warned_shared_id = True
                    _log.warning("mllmcal: request id %r finished again while awaiting "
                                 "feedback (n > 1, or an id reused); feedback by this id goes "
                                 "to the request that finished last. Said once.", req.rid)
                self._awaiting[req.rid] = (int(req.tokens[p]), req.confidence[p],
                                           req.temperature, req.fb_row)
                while len(self._awaiting) > self.config.max_awaiting_feedback:
                    self._awaiting.popitem(last=False)
                early = self._early_feedback.pop(req.rid, None)
            req.fb_row = None
            if early is not None:
                self._inbox.append(early)  # applied by this drain's feedback pass
        req.fb_rows.clear()

    def _write(self, record: dict) -> None:
        path = self.config.records
        if not path:
            return
        if self._records_file is None:
            # One write() per line on a file opened for append: lines from several
            # processes (data-parallel engines) interleave whole, never torn.
            self._records_file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._records_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._records_file.flush()

    # ---------------------------------------------------------------- feedback

    def _read_feedback(self) -> None:
        while self._inbox:
            self._apply_feedback(self._inbox.popleft())
        path = self.config.feedback
        if not path:
            return
        try:
            size = os.path.getsize(path)
        except OSError:
            return
        if size <= self._feedback_pos:
            return
        with open(path, "rb") as f:
            f.seek(self._feedback_pos)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a half-written last line is read next time
        self._feedback_pos += end
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                self._apply_feedback(_feedback_item(json.loads(line)))
            except (ValueError, TypeError) as exc:
                _log.warning("mllmcal: bad feedback line %r in %s: %s", line[:200], path, exc)

    def _apply_feedback(self, item: dict[str, Any]) -> bool:
        found = self._awaiting.pop(item["id"], None)
        if found is None:
            self._early_feedback[item["id"]] = item
            while len(self._early_feedback) > self.config.max_awaiting_feedback:
                self._early_feedback.popitem(last=False)
            return False
        token, conf, temperature, row = found
        label = item["label"]
        correct = (label == token) if label is not None else bool(item["correct"])
        if label is not None and row is not None and label < row.shape[-1]:
            # The right token's logit is known: score the kept row exactly at the
            # temperature the request was served with (histogram, NLL, Brier), then let the
            # online estimator take its Newton step on it.
            row = row.cpu()
            y = torch.tensor([label])
            self.state.update_logits(row[None], y, temperature=temperature)
            if self.online is not None:
                self.online.update(row[None], y)
                self.temperature = self.online.temperature
        elif conf is not None:
            self.state.update(torch.tensor([conf]), torch.tensor([correct]))
        else:
            return True
        self.n_feedback += 1
        m = self._metrics
        if m:
            m["feedback"].inc()
            m["ece"].set(self.state.ece("l1"))
            m["accuracy"].set(self.state.accuracy())
            m["temperature"].set(self.temperature)
        return True


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


