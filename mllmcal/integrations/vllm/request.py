"""What the tracker knows about one request, and the per-token entries (one per row of a
step that may have produced one of its tokens) that reach it."""

from __future__ import annotations

import collections
import itertools
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from .steps import StepStats
from .token_logits import wanted_logits

__all__ = ["CommittedToken", "Request", "TokenRow"]

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below it a request is sampled greedily
_ids = itertools.count()


@dataclass(frozen=True, slots=True)
class TokenRow:
    """V1: row ``row`` of step ``stats`` may have produced output token ``index`` of its
    request (it did once the request's output list is longer than ``index``, unless a
    later row with the same ``index`` supersedes it: a prompt chunk)."""

    index: int
    stats: StepStats
    row: int


@dataclass(frozen=True, slots=True)
class CommittedToken:
    """V2: output token ``index`` of a request, known from the device.

    Attributes:
        index: position among the request's output tokens.
        token: the token id.
        confidence, entropy: the step's statistics of its row.
        logprob: the token's log-probability at the step's temperature, None where it
            cannot be known exactly.
        stats: the step (its temperature, and the key of a kept feedback row).
    """

    index: int
    token: int
    confidence: float
    entropy: float
    logprob: float | None
    stats: StepStats


class Request:
    """What the tracker knows about one request, and its per-token values so far."""

    __slots__ = ("rid", "max_tokens", "min_tokens", "stop_ids", "opt_logprobs", "needs_rows",
                 "keep_row", "fb_position", "tokens", "entries", "confidence", "entropy",
                 "logprob", "fb_row", "fb_rows", "ended", "ended_by", "written", "n_known", "n_out",
                 "temperature", "key", "greedy_plain", "scale", "token_logits", "stop_below",
                 "stop_window", "stop_eos", "conf_window", "stop_probes", "forced_at",
                 "reply_key", "n_sent", "__weakref__")

    def __init__(self, params: Any, tokens: list[int] | None = None,
                 apply_temperature: bool = False) -> None:
        extra = getattr(params, "extra_args", None) or {}
        rid = extra.get("mllmcal_id")
        self.rid = str(rid) if rid is not None else f"mllmcal-{uuid.uuid4().hex[:12]}-{next(_ids)}"
        self.max_tokens = getattr(params, "max_tokens", None)
        self.min_tokens = getattr(params, "min_tokens", 0) or 0
        ignore_eos = getattr(params, "ignore_eos", False)
        stop_tokens = set(getattr(params, "stop_token_ids", None) or ())
        if not ignore_eos:
            stop_tokens |= set(getattr(params, "all_stop_token_ids", None) or ())
        self.stop_ids = frozenset(stop_tokens)
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
        # opt-in logits of chosen token ids per step (mllmcal_logits_ids; V1 runner only)
        self.token_logits = wanted_logits(extra)
        # Stop when the mean confidence of the last ``stop_window`` tokens is below
        # ``stop_below``: the runner forces ``stop_eos`` (EOS, or with ignore_eos the first
        # stop token id) at the next step it sees the window's values (see .v1).
        below = extra.get("mllmcal_stop_below")
        self.stop_below = float(below) if below is not None else None
        self.stop_window = int(extra.get("mllmcal_stop_window", 16))
        eos = None if ignore_eos else getattr(params, "eos_token_id", None)
        if eos is None:
            eos = next(iter(sorted(getattr(params, "stop_token_ids", None) or ())), None)
        self.stop_eos: int | None = eos
        self.conf_window: collections.deque[float] = collections.deque(maxlen=self.stop_window)
        # (step, row, token index) of rows seen by the engine thread, not in the window yet
        self.stop_probes: collections.deque[tuple[StepStats, int, int]] = collections.deque()
        self.forced_at: int | None = None  # index of the token forced to stop_eos
        # Response statistics: the private key the values are published under (set by the
        # API server's middleware or with_stats, never by a client), and how many were.
        key = extra.get("mllmcal_key")
        self.reply_key: str | None = str(key) if key else None
        self.n_sent = 0
        # V1: vLLM's live output-token list; V2: filled by the tracker as tokens commit.
        self.tokens: list[int] = tokens if tokens is not None else []
        self.entries: collections.deque[TokenRow | CommittedToken] = collections.deque()
        self.confidence: list[float | None] = []
        self.entropy: list[float | None] = []
        self.logprob: list[float | None] = []
        # The feedback position's logits row once committed; until then the candidate
        # rows, keyed by id() of the step that saw them.
        self.fb_row: torch.Tensor | None = None
        self.fb_rows: dict[int, torch.Tensor] = {}
        self.ended = False
        self.ended_by = ""
        self.written = False
        self.n_known = 0
        # V1: the output list's length as the drain thread read it before taking the
        # queued steps (see V1Tracker._before_drain).
        self.n_out = 0
        self.temperature = 1.0
        self.key: Any = None  # what the runner recognises the request by when it returns

    def finished_by_tokens(self) -> str:
        """'length', 'stop' or 'low_confidence' (a stop token was forced) when the committed
        tokens alone show the request is over."""
        n = len(self.confidence)
        if self.forced_at is not None and n > self.forced_at:
            return "low_confidence"
        if self.max_tokens is not None and n >= self.max_tokens:
            return "length"
        if n and n >= self.min_tokens and self.tokens[n - 1] in self.stop_ids:
            return "stop"
        return ""
