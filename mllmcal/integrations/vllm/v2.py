"""The processor for vLLM's Model Runner V2: one class, one interface
(``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``, vLLM >= 0.25)."""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .common import ProcessorCore, scale_rows, writer_rank
from .config import Config
from .request import CommittedToken, Request
from .steps import CONF, ENT, LSE, PRED, SavedLogits, StepStats, token_logprob
from .tracker import Tracker

__all__ = ["V2CalibratedLogitsProcessor", "V2Step", "V2Tracker"]

_log = logging.getLogger("mllmcal")

# Rows that V2Tracker._resolve appends to a step's CONF, ENT, LSE, PRED rows.
_SLOT, _POS, _TOK, _COMMITTED, _CHOSEN = range(4, 9)


@dataclass(frozen=True)
class V2Step:
    """One ``apply`` of Model Runner V2, until its rows' tokens are read back.

    Attributes:
        stats: the step's statistics, one row per logits row.
        slot: int64 ``[R]`` on the device: each row's request slot (a private copy of
            ``expanded_idx_mapping``).
        pos: int64 ``[R]`` on the device: each row's position (a copy of ``pos``).
        requests: slot -> the request in it at this step.
        prompt_len: slot -> that request's prompt length at this step (a reused slot
            gets another request's by the time the step is read back).
    """

    stats: StepStats
    slot: torch.Tensor
    pos: torch.Tensor
    requests: dict[int, Request]
    prompt_len: dict[int, int]


class V2Tracker(Tracker):
    """Bookkeeping for Model Runner V2.

    V2 hands ``apply`` a :class:`LogitsContext` whose ``expanded_idx_mapping`` maps rows to
    request slots and whose ``pos`` is each row's position; the committed tokens live on
    the device in ``req_states.all_token_ids`` (valid below ``total_len``). The token row
    ``r`` produced is ``all_token_ids[slot, pos + 1]`` once ``pos + 1 < total_len[slot]``:
    the tracker gathers it on the device at the next ``add_request`` or ``apply`` (before a
    reused slot's tokens are overwritten, which happens after ``add_request``), and copies
    the step's values to the host without waiting. Rows whose ``pos + 1`` is inside the
    prompt (prefill chunks) or that were not accepted (rejected drafts) produce nothing.
    """

    def __init__(self, config: Config, req_states: Any, writer_rank: bool = True) -> None:
        super().__init__(config, writer_rank=writer_rank)
        self.req_states = req_states
        self.slots: dict[int, Request] = {}
        self._unresolved: list[V2Step] = []  # tokens not gathered yet (engine thread)
        self._pending: collections.deque[V2Step] = collections.deque()  # copies in flight
        self._warned_stop = False

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        self._resolve()
        with self._lock:
            old = self.slots.pop(req_idx, None)
            if old is not None:
                self.detach(id(old.key), old)
            req = self.reattach(id(sampling_params))
            if req is None:
                req = Request(sampling_params, None, self.config.apply_temperature)
                req.key = sampling_params
                if req.stop_below is not None and not self._warned_stop:
                    self._warned_stop = True
                    _log.warning("mllmcal: mllmcal_stop_below is not supported by Model "
                                 "Runner V2 (VLLM_USE_V2_MODEL_RUNNER=0 selects V1); the "
                                 "request runs to its end. Said once.")
                self.open_request(req)
            self.slots[req_idx] = req
        # True: V2 calls apply() only for batches with a request that needs processing,
        # and mllmcal observes every request (this makes vLLM copy the logits to fp32
        # once per step, see the package docs).
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        self._resolve()
        slots_np = ctx.idx_mapping_np
        if logits.shape[0] == 0 or len(slots_np) == 0:
            return logits
        t = self.temperature
        stats = StepStats.observe(logits, t)  # launched once the rows' tokens are gathered
        requests: dict[int, Request] = {}
        prompt_lens: dict[int, int] = {}
        prompt_len = self.req_states.prompt_len.np
        saved_rows: list[int] = []
        plain = logits.shape[0] == len(slots_np)  # one row per request: rows follow idx_mapping
        for j, slot in enumerate(slots_np.tolist()):
            req = self.slots.get(slot)
            if req is None:
                continue
            requests[slot] = req
            plen = prompt_lens[slot] = int(prompt_len[slot])
            if plain and req.needs_rows:
                saved_rows.append(j)
            if req.keep_row and plain and req.n_known <= req.fb_position:
                # Without speculative decoding the host knows the row's sequence length
                # (seq_lens_upper_bound_np is exact then), hence its output index. With it,
                # feedback rows are not kept (feedback then updates only the histogram).
                if int(ctx.seq_lens_upper_bound_np[j]) - plen == req.fb_position:
                    req.fb_rows[id(stats)] = logits[j].clone()
        if not plain and any(q.needs_rows for q in requests.values()):
            # Several rows per request (speculative decoding): which rows are whose is on
            # the device only; keep the whole batch's logits for this step.
            saved_rows = list(range(logits.shape[0]))
        if saved_rows:
            stats.saved = SavedLogits.take(logits, saved_rows)
        scaled = [j for j, slot in enumerate(slots_np.tolist())
                  if slot in requests and requests[slot].scale] if plain else []
        if scaled and t != 1.0:
            scale_rows(logits, scaled, t)
        step = V2Step(stats, ctx.expanded_idx_mapping.to(torch.long).clone(),
                      ctx.pos.to(torch.long).clone(), requests, prompt_lens)
        with self._lock:
            self._unresolved.append(step)
        return logits

    def _resolve(self) -> None:
        """Gather, on the device, the token each row of the earlier steps produced."""
        if not self._unresolved:
            return
        with self._lock:  # flush() may run this from another thread
            steps, self._unresolved = self._unresolved, []
        rs = self.req_states
        all_ids = rs.all_token_ids.gpu
        total = rs.total_len.gpu
        for step in steps:
            slot, pos, stats = step.slot, step.pos, step.stats
            nxt = (pos + 1).clamp_(max=all_ids.shape[1] - 1)
            tok = all_ids[slot, nxt].to(torch.long)
            committed = (pos + 1) < total[slot].to(torch.long)
            chosen = torch.full(slot.shape, math.nan, dtype=torch.float32, device=slot.device)
            if stats.saved is not None:
                idx = stats.saved.index
                z = stats.saved.logits.gather(1, tok[idx].clamp(min=0).unsqueeze(1)).squeeze(1)
                chosen[idx] = z.to(torch.float32)
                stats.saved = None
            stats.append_rows((slot, pos, tok, committed, chosen))
            stats.launch_copy()
            self._pending.append(step)

    def _before_final(self) -> None:
        self._resolve()

    def drain(self, final: bool = False) -> None:
        with self._lock:
            self._collect(final)
            super().drain(final)

    def _collect(self, final: bool) -> None:
        """Move ready steps' committed rows into their requests (in step order)."""
        pending = self._pending
        while pending:
            if final:
                pending[0].stats.wait()
            elif not pending[0].stats.ready():
                return
            step = pending.popleft()
            stats = step.stats
            v = stats.values()
            t = stats.temperature
            for r in range(len(v[0])):
                if not v[_COMMITTED][r]:
                    continue
                slot, pos, tok = int(v[_SLOT][r]), int(v[_POS][r]), int(v[_TOK][r])
                req = step.requests.get(slot)
                if req is None:
                    continue
                k = pos + 1 - step.prompt_len[slot]
                if k < 0:
                    continue
                conf, ent, lse, pred = v[CONF][r], v[ENT][r], v[LSE][r], v[PRED][r]
                lp = token_logprob(tok, pred, conf, lse, v[_CHOSEN][r], t)
                req.entries.append(CommittedToken(k, tok, conf, ent, lp, stats))

    def _commit_ready(self, req: Request, final: bool) -> None:
        while req.entries:
            e: CommittedToken = req.entries.popleft()
            if e.index < len(req.confidence):
                continue  # already committed (a resumed request's re-prefill)
            if e.index == len(req.tokens):
                req.tokens.append(e.token)
            self._commit(req, e.index, e.confidence, e.entropy, e.logprob, e.stats,
                         e.stats.temperature)
            req.n_known = len(req.confidence)


class V2CalibratedLogitsProcessor(ProcessorCore, V2LogitsProcessor):
    """mllmcal's processor for Model Runner V2, built by vLLM as
    ``(vllm_config, req_states)`` (the rest: :class:`~.common.ProcessorCore`)."""

    runner = "v2"
    per_step = ("add_request", "apply")

    def __init__(self, vllm_config: Any, req_states: Any) -> None:
        self._start(vllm_config, lambda cfg: V2Tracker(cfg, req_states, writer_rank()))

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        """Inactive: False, so that V2 never calls apply() on this instance's account;
        active: the tracker's (called directly, see ``per_step``)."""
        return self.tracker is not None and self.tracker.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        return None
