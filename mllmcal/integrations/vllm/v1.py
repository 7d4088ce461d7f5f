"""The processor for vLLM's V1 model runner (its persistent batch): one class, one
interface (``vllm.v1.sample.logits_processor.LogitsProcessor``)."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

from .common import ProcessorCore, scale_rows, writer_rank
from .config import Config
from .request import Request, TokenRow
from .steps import CONF, ENT, LSE, PRED, ChosenLogit, SavedLogits, StepStats, token_logprob
from .token_logits import keep_token_logits
from .tracker import Tracker

__all__ = ["V1CalibratedLogitsProcessor", "V1Step", "V1Tracker"]


@dataclass(frozen=True)
class V1Step:
    """One step of the V1 runner as the engine thread saw it.

    Attributes:
        stats: the step's statistics, row ``r`` for batch row ``r``.
        requests: the request of each batch row (None: an empty slot).
        n_tokens: each row's request's output length when the row was seen: the index
            of the token the row produces, if it produces one.
    """

    stats: StepStats
    requests: list[Request | None]
    n_tokens: list[int]


class V1Tracker(Tracker):
    """Bookkeeping for the V1 model runner's persistent batch.

    Row ``r`` of the logits belongs to the request added at batch index ``r`` (after the
    removed/added/moved updates of this step). The token a row produced is known once the
    request's live output list (handed over in ``BatchUpdate.added``) has grown past the
    length it had when the row was seen; a row after which the list did not grow (a chunk of
    a prompt prefilled in several steps) is superseded by the next row of the same request.
    The engine thread queues each :class:`V1Step` whole; the drain thread hands its rows
    to their requests as :class:`~.request.TokenRow` entries.
    """

    def __init__(self, config: Config, device: torch.device, writer_rank: bool = True) -> None:
        super().__init__(config, writer_rank=writer_rank)
        self.device = device
        self.rows: list[Request | None] = []
        self._saved_rows: list[int] = []  # rows whose logits are kept until the token is known
        self._fb_rows: list[int] = []     # rows of requests that keep a feedback row
        self._scaled_rows: list[int] = []  # rows to divide by the calibration temperature
        self._logit_rows: list[int] = []  # rows that keep logits of chosen ids (opt-in)
        self._stop_rows: list[int] = []    # rows of requests that may stop on low confidence
        self._saved_steps: list[V1Step] = []  # steps with saved rows not all read yet
        self._new_steps: collections.deque[V1Step] = collections.deque()  # not handed out

    # ------------------------------------------------------------ engine thread

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # The tokens of the previous step are in the output lists now: read the logits of
        # the opted-in rows at them before those rows are dropped.
        if self._saved_steps:
            self._resolve_saved(superseded=True)
        if batch_update is None:
            return
        with self._lock:
            rows = self.rows
            need = max((batch_update.batch_size, *(i + 1 for i, *_ in batch_update.added),
                        *(max(a, b) + 1 for a, b, _ in batch_update.moved)))
            if len(rows) < need:
                rows.extend([None] * (need - len(rows)))
            for i in batch_update.removed:
                self._vacate(i)
            for i, params, _prompt, output in batch_update.added:
                self._vacate(i)
                req = self.reattach(id(output))
                if req is None:
                    req = Request(params, output, self.config.apply_temperature)
                    self.open_request(req)
                rows[i] = req
            for a, b, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    rows[a], rows[b] = rows[b], rows[a]
                else:
                    self._vacate(b)
                    rows[b], rows[a] = rows[a], None
            del rows[batch_update.batch_size:]
            live = [(r, q) for r, q in enumerate(rows) if q is not None]
            self._saved_rows = [r for r, q in live if q.needs_rows]
            self._fb_rows = [r for r, q in live if q.keep_row]
            self._scaled_rows = [r for r, q in live if q.scale]
            self._logit_rows = [r for r, q in live if q.token_logits is not None]
            self._stop_rows = [r for r, q in live if q.stop_below is not None]

    def _vacate(self, i: int) -> None:
        req = self.rows[i] if i < len(self.rows) else None
        if req is not None:
            self.rows[i] = None
            # Keyed by the output list: vLLM hands the same list back when it re-adds a
            # request it had taken out of the batch (unscheduled or preempted).
            self.detach(id(req.tokens), req)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        n = min(logits.shape[0], len(self.rows))
        if n == 0:
            return logits
        t = self.temperature
        stats = StepStats.observe(logits, t)  # launched below, after the kept copies
        reqs = self.rows[:n]
        step = V1Step(stats, reqs, [len(q.tokens) if q is not None else -1 for q in reqs])
        if self._saved_rows:
            # Opted-in sampled requests: vLLM scales these logits by the sampling
            # temperature in place after this returns, so keep a copy.
            sel = [r for r in self._saved_rows if r < n]
            if sel:
                stats.saved = SavedLogits.take(logits, sel, {r: j for j, r in enumerate(sel)})
                with self._lock:
                    self._saved_steps.append(step)
        for r in self._fb_rows:
            if r < n and step.n_tokens[r] == reqs[r].fb_position:
                reqs[r].fb_rows[id(stats)] = logits[r].clone()
        if self._logit_rows:
            keep_token_logits(logits, self._logit_rows, reqs, step.n_tokens)
        if self._stop_rows:
            self._stop_low_confidence(logits, step)
        stats.launch_copy()
        self._new_steps.append(step)
        if self._scaled_rows and t != 1.0:
            scale_rows(logits, [r for r in self._scaled_rows if r < n], t)
        return logits

    def _stop_low_confidence(self, logits: torch.Tensor, step: V1Step) -> None:
        """Force the stop token on the rows of requests whose mean confidence over their
        last ``stop_window`` tokens is below ``stop_below``.

        Decided on the host from the values of earlier steps whose copy has completed (no
        wait): on the CPU that is every earlier step, so the token after the window is the
        stop token; on a GPU the copy of the step just before may still be in flight, and
        the stop comes one token (rarely more) later. The forced row keeps the statistics
        of its unforced distribution; the stop token's log-probability under it is read
        like an opted-in row's (one-element copy)."""
        stats = step.stats
        for r in self._stop_rows:
            if r >= len(step.requests):
                continue
            req = step.requests[r]
            probes = req.stop_probes
            while probes and probes[0][0].ready():
                st, row, k = probes[0]
                if len(probes) > 1 and probes[1][2] == k:
                    probes.popleft()  # a prompt chunk: the next row has the same index
                elif len(req.tokens) > k:
                    req.conf_window.append(st.value(CONF, row))
                    probes.popleft()
                else:
                    break
            probes.append((stats, r, step.n_tokens[r]))
            w = req.conf_window
            if req.forced_at is None and not (
                    len(w) == req.stop_window and sum(w) / len(w) < req.stop_below):
                continue
            if req.forced_at is None:
                req.forced_at = step.n_tokens[r]
            eos = req.stop_eos
            if eos is None or eos >= logits.shape[1]:
                continue
            stats.chosen[r] = ChosenLogit(StepStats((logits[r, eos:eos + 1].clone(),)), 0)
            keep = logits[r, eos].clone()
            logits[r].fill_(float("-inf"))
            logits[r, eos] = keep

    def _resolve_saved(self, superseded: bool) -> None:
        """Read the opted-in rows' logits at their chosen tokens, for rows whose token is
        known. ``superseded``: a new step has begun (or the engine is done), so rows whose
        list did not grow produced nothing (prompt chunks) and their copies are dropped."""
        with self._lock:
            keep = []
            for step in self._saved_steps:
                stats, saved = step.stats, step.stats.saved
                if saved is None:
                    continue
                if not stats.ready():
                    keep.append(step)
                    continue
                js, toks, done, waiting = [], [], [], False
                for r, j in saved.position.items():
                    if r in stats.chosen:
                        continue
                    req, k = step.requests[r], step.n_tokens[r]
                    if len(req.tokens) > k and req.tokens[k] >= 0:
                        done.append(r)
                        js.append(j)
                        toks.append(req.tokens[k])
                    else:
                        waiting = True
                if js:
                    ij = torch.tensor([js, toks], dtype=torch.long)  # see SavedLogits.take
                    ij = ij.to(saved.logits.device, non_blocking=True)
                    chunk = StepStats((saved.logits[ij[0], ij[1]],))
                    for i, r in enumerate(done):
                        stats.chosen[r] = ChosenLogit(chunk, i)
                if waiting and not superseded:
                    keep.append(step)
                else:
                    stats.saved = None
            self._saved_steps = keep

    # ------------------------------------------------------------ drain thread

    def _before_drain(self) -> None:
        # Each output list's length first, then the queued steps. The engine thread queues
        # a step (apply) before vLLM appends the tokens of its rows, so every token counted
        # here has the row that produced it among the entries taken below. The other order
        # let a token appended in between be counted while its row was still queued: the
        # entry before it (a prompt chunk, same index) was then committed for it.
        for req in itertools.chain(self._active, self._ended):
            req.n_out = len(req.tokens)
        steps = self._new_steps  # each queued step's rows to their requests, in step order
        while steps:
            step = steps.popleft()
            stats, n_tokens = step.stats, step.n_tokens
            for r, req in enumerate(step.requests):
                if req is not None:
                    req.entries.append(TokenRow(n_tokens[r], stats, r))
        # From the drain thread too: otherwise an idle engine (a server after its last
        # request) would keep the last step's opted-in rows, and their records, forever.
        if self._saved_steps:
            self._resolve_saved(superseded=False)

    def _before_final(self) -> None:
        if self._saved_steps:
            self._resolve_saved(superseded=True)

    def _commit_ready(self, req: Request, final: bool) -> None:
        entries, tokens = req.entries, req.tokens
        while entries:
            e: TokenRow = entries[0]
            k, stats, r = e.index, e.stats, e.row
            produced = req.n_out > k  # as read before the entries were taken
            if len(entries) > 1 and entries[1].index == k:
                entries.popleft()
                continue
            if not produced:
                if final:
                    entries.popleft()
                    continue
                return
            if not stats.ready():
                return
            chosen = stats.chosen.get(r)
            if chosen is None and stats.saved is not None and r in stats.saved.position:
                return  # an opted-in row whose chosen logit is not read yet
            if chosen is not None and not chosen.values.ready():
                return
            tok = tokens[k]
            v = stats.values()
            conf, ent, lse, pred = v[CONF][r], v[ENT][r], v[LSE][r], v[PRED][r]
            if tok < 0 and k == req.forced_at and req.stop_eos is not None:
                tok = req.stop_eos  # forced by _stop_low_confidence
            if tok < 0:
                # Async scheduling appends a placeholder that vLLM replaces only when its
                # own processors need the ids. A greedy request without penalties chose
                # the argmax of these logits; any other waits for the real id.
                if req.greedy_plain and pred >= 0:
                    tok = int(pred)
                elif not final:
                    return
            t = stats.temperature
            logit = chosen.values.values()[0][chosen.index] if chosen is not None else None
            self._commit(req, k, conf, ent, token_logprob(tok, pred, conf, lse, logit, t),
                         stats, t)
            entries.popleft()


class V1CalibratedLogitsProcessor(ProcessorCore, V1LogitsProcessor):
    """mllmcal's processor for the V1 model runner, built by vLLM as
    ``(vllm_config, device, is_pin_memory)`` (the rest: :class:`~.common.ProcessorCore`)."""

    runner = "v1"
    per_step = ("update_state", "apply")

    def __init__(self, vllm_config: Any, device: torch.device | str,
                 is_pin_memory: bool = False) -> None:
        dev = torch.device(device)
        self._start(vllm_config, lambda cfg: V1Tracker(cfg, dev, writer_rank()))

    def is_argmax_invariant(self) -> bool:
        # Active: False although the logits are untouched: V1 skips argmax-invariant
        # processors for all-greedy batches, and it would also hand them logits already
        # divided by the sampling temperature. Inactive: True, so that V1 does not call
        # apply() for all-greedy batches at all.
        return not self.active

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Inactive: nothing; active: the tracker's (called directly, see ``per_step``)."""
        if self.tracker is not None:
            self.tracker.update_state(batch_update)
