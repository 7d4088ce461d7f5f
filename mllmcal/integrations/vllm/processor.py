"""The vLLM logits processors: one class that implements both of vLLM's interfaces.

vLLM instantiates a processor class with ``(vllm_config, device, is_pin_memory)`` in the V1
model runner and with ``(vllm_config, req_states)`` in Model Runner V2, and each loader
checks ``issubclass`` against its own abstract base. :class:`CalibratedLogitsProcessor`
derives from both bases (V2's only where the installed vLLM has it) and picks its mode
from the constructor's arguments, so one name serves either runner. The work is done by
:class:`V1Tracker` or :class:`V2Tracker`, which differ only in how they learn which token a
row produced.
"""

from __future__ import annotations

import collections
import math
import weakref
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

from ...ops import token_stats
from ._core import CONF, ENT, LSE, PRED, Config, Request, StepStats, Tracker

try:  # Model Runner V2's interface (vLLM >= 0.25)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor
except ImportError:  # an older vLLM: V1 only
    V2LogitsProcessor = None
    LogitsContext = Any

__all__ = ["CalibratedLogitsProcessor", "V1Tracker", "V2Tracker"]


def _writer_rank() -> bool:
    """Whether this process writes records and metrics: with tensor parallelism every rank
    runs the sampler (and its processors) on the same logits, so only TP rank 0 of the last
    pipeline stage writes."""
    try:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0 and get_pp_group().is_last_rank
    except Exception:  # no distributed state (hand-built tests, single process)
        return True


def _scale_rows(logits: torch.Tensor, rows: list[int], t: float) -> None:
    """``logits[rows] /= t`` in place, after the statistics and any kept copies were taken.
    All rows: one op; some: one small op per row, so no ``[b, V]`` temporary."""
    if len(rows) == logits.shape[0]:
        logits.div_(t)
    else:
        for r in rows:
            logits[r].div_(t)


def _log_conf(conf: float) -> float | None:
    return math.log(conf) if conf > 0 else None


# --------------------------------------------------------------------------- V1


class V1Tracker(Tracker):
    """Bookkeeping for the V1 model runner's persistent batch.

    Row ``r`` of the logits belongs to the request added at batch index ``r`` (after the
    removed/added/moved updates of this step). The token a row produced is known once the
    request's live output list (handed over in ``BatchUpdate.added``) has grown past the
    length it had when the row was seen; a row after which the list did not grow (a chunk of
    a prompt prefilled in several steps) is superseded by the next row of the same request.
    """

    def __init__(self, config: Config, device: torch.device, writer_rank: bool = True) -> None:
        super().__init__(config, writer_rank=writer_rank)
        self.device = device
        self.rows: list[Request | None] = []
        self._saved_rows: list[int] = []  # rows whose logits are kept until the token is known
        self._fb_rows: list[int] = []     # rows of requests that keep a feedback row
        self._scaled_rows: list[int] = []  # rows to divide by the calibration temperature
        self._saved_steps: list[tuple[StepStats, list[tuple[Request, int, int]]]] = []

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
            need = batch_update.batch_size
            for i, _, _, _ in batch_update.added:
                need = max(need, i + 1)
            for a, b, _ in batch_update.moved:
                need = max(need, a + 1, b + 1)
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
            self._saved_rows = [r for r, q in enumerate(rows) if q is not None and q.needs_rows]
            self._fb_rows = [r for r, q in enumerate(rows) if q is not None and q.keep_row]
            self._scaled_rows = [r for r, q in enumerate(rows) if q is not None and q.scale]

    def _vacate(self, i: int) -> None:
        req = self.rows[i] if i < len(self.rows) else None
        if req is not None:
            self.rows[i] = None
            # Keyed by the output list: vLLM hands the same list back when it re-adds a
            # request it had taken out of the batch (unscheduled or preempted).
            self.detach(id(req.tokens), req)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        n = min(logits.shape[0], len(rows))
        if n == 0:
            return logits
        t = self.temperature
        s = token_stats(logits, temperature=t)
        # defer: on a GPU the copy's event is recorded after the opted-in rows are copied
        # below, so a ready step also has its saved rows in place (read by the drain thread).
        step = StepStats((s.confidence, s.entropy, s.logsumexp, s.prediction), defer=True)
        if self._saved_rows:
            # The only [b, V] allocation, for opted-in sampled requests: vLLM scales these
            # logits by the sampling temperature in place after this returns, so a
            # reference would not keep the values the statistics were computed from.
            sel = [r for r in self._saved_rows if r < n]
            if sel:
                idx = torch.tensor(sel, dtype=torch.long).to(logits.device, non_blocking=True)
                step.saved = logits.index_select(0, idx)
                step.saved_rows = {r: j for j, r in enumerate(sel)}
                items = [(rows[r], len(rows[r].tokens), r) for r in sel]
                with self._lock:
                    self._saved_steps.append((step, items))
        for r in self._fb_rows:
            if r < n:
                req = rows[r]
                if len(req.tokens) == req.fb_position:
                    req.fb_rows[id(step)] = logits[r].clone()
        step.launch_copy()
        for r in range(n):
            req = rows[r]
            if req is not None:
                req.entries.append((len(req.tokens), step, r, t))
        if self._scaled_rows and t != 1.0:
            _scale_rows(logits, [r for r in self._scaled_rows if r < n], t)
        return logits

    def _resolve_saved(self, superseded: bool) -> None:
        """Read the opted-in rows' logits at their chosen tokens, for rows whose token is
        known. ``superseded``: a new step has begun (or the engine is done), so rows whose
        list did not grow produced nothing (prompt chunks) and their copies are dropped."""
        with self._lock:
            keep = []
            for step, items in self._saved_steps:
                if step.saved is None or not step.ready():
                    if step.saved is not None:
                        keep.append((step, items))
                    continue
                js, toks, done, rest = [], [], [], []
                for req, k, r in items:
                    if len(req.tokens) > k and req.tokens[k] >= 0:
                        done.append(r)
                        js.append(step.saved_rows[r])
                        toks.append(req.tokens[k])
                    else:
                        rest.append((req, k, r))
                if js:
                    # Built on the host and copied without blocking: torch.tensor(...,
                    # device="cuda") would be a synchronous copy.
                    ij = torch.tensor([js, toks], dtype=torch.long)
                    ij = ij.to(step.saved.device, non_blocking=True)
                    vals = step.saved[ij[0], ij[1]]
                    chunk = StepStats((vals,))
                    for i, r in enumerate(done):
                        step.chosen[r] = (chunk, i)
                if rest and not superseded:
                    keep.append((step, rest))
                else:
                    step.saved = None
            self._saved_steps = keep

    def _before_drain(self) -> None:
        # From the drain thread too: otherwise an idle engine (a server after its last
        # request) would keep the last step's opted-in rows, and their records, forever.
        if self._saved_steps:
            self._resolve_saved(superseded=False)

    def _before_final(self) -> None:
        if self._saved_steps:
            self._resolve_saved(superseded=True)

    # ------------------------------------------------------------ drain thread

    def _commit_ready(self, req: Request, final: bool) -> None:
        entries, tokens = req.entries, req.tokens
        while entries:
            k, step, r, t = entries[0]
            produced = len(tokens) > k  # read before looking for a superseding row
            if len(entries) > 1 and entries[1][0] == k:
                entries.popleft()
                continue
            if not produced:
                if final:
                    entries.popleft()
                    continue
                return
            if not step.ready():
                return
            chosen = step.chosen.get(r)
            if chosen is None and step.saved is not None and r in step.saved_rows:
                return  # an opted-in row whose chosen logit is not read yet
            if chosen is not None and not chosen[0].ready():
                return
            tok = tokens[k]
            v = step.values()
            conf, ent, lse, pred = v[CONF][r], v[ENT][r], v[LSE][r], v[PRED][r]
            if tok < 0:
                # Async scheduling appends a placeholder that vLLM replaces only when its
                # own processors need the ids. A greedy request without penalties chose
                # the argmax of these logits; any other waits for the real id.
                if req.greedy_plain and pred >= 0:
                    tok = int(pred)
                elif not final:
                    return
            if tok >= 0 and tok == pred:
                lp = _log_conf(conf)
            elif chosen is not None:
                lp = chosen[0].values()[0][chosen[1]] / t - lse
            else:
                lp = None
            self._commit(req, k, conf, ent, lp, step, t)
            entries.popleft()


# --------------------------------------------------------------------------- V2

# Rows that V2Tracker._resolve appends to a step's CONF, ENT, LSE, PRED rows.
_SLOT, _POS, _TOK, _COMMITTED, _CHOSEN = range(4, 9)


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
        self._unresolved: list[StepStats] = []  # tokens not gathered yet (engine thread)
        self._pending: collections.deque[StepStats] = collections.deque()  # copies in flight

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
        s = token_stats(logits, temperature=t)
        step = StepStats((s.confidence, s.entropy, s.logsumexp, s.prediction), defer=True)
        by_slot: dict[int, tuple[Request, int]] = {}
        prompt_len = self.req_states.prompt_len.np
        saved_rows: list[int] = []
        plain = logits.shape[0] == len(slots_np)  # one row per request: rows follow idx_mapping
        for j, slot in enumerate(slots_np.tolist()):
            req = self.slots.get(slot)
            if req is None:
                continue
            # The prompt length now: a reused slot gets another request's by the time the
            # step is read back.
            by_slot[slot] = (req, int(prompt_len[slot]))
            if plain and req.needs_rows:
                saved_rows.append(j)
            if req.keep_row and plain and req.n_known <= req.fb_position:
                # Without speculative decoding the host knows the row's sequence length
                # (seq_lens_upper_bound_np is exact then), hence its output index. With it,
                # feedback rows are not kept (feedback then updates only the histogram).
                k = int(ctx.seq_lens_upper_bound_np[j]) - by_slot[slot][1]
                if k == req.fb_position:
                    req.fb_rows[id(step)] = logits[j].clone()
        if not plain and any(q.needs_rows for q, _ in by_slot.values()):
            # Several rows per request (speculative decoding): which rows are whose is on
            # the device only; keep the whole batch's logits for this step.
            saved_rows = list(range(logits.shape[0]))
        if saved_rows:
            idx = torch.tensor(saved_rows, dtype=torch.long).to(logits.device, non_blocking=True)
            step.saved = logits.index_select(0, idx)
            step.saved_rows = {"index": idx}
        scaled = [j for j, slot in enumerate(slots_np.tolist())
                  if slot in by_slot and by_slot[slot][0].scale] if plain else []
        if scaled and t != 1.0:
            _scale_rows(logits, scaled, t)
        step.extra = (ctx.expanded_idx_mapping.to(torch.long).clone(),
                      ctx.pos.to(torch.long).clone(), by_slot, t)
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
            slot, pos, _, t = step.extra
            nxt = (pos + 1).clamp_(max=all_ids.shape[1] - 1)
            tok = all_ids[slot, nxt].to(torch.long)
            committed = (pos + 1) < total[slot].to(torch.long)
            chosen = torch.full(slot.shape, math.nan, dtype=torch.float32, device=slot.device)
            if step.saved is not None:
                idx = step.saved_rows["index"]
                z = step.saved.gather(1, tok[idx].clamp(min=0).unsqueeze(1)).squeeze(1)
                chosen[idx] = z.to(torch.float32)
                step.saved = None
            step.append_rows((slot, pos, tok, committed, chosen))
            step.launch_copy()
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
                pending[0].wait()
            elif not pending[0].ready():
                return
            step = pending.popleft()
            v = step.values()
            _, _, by_slot, t = step.extra
            for r in range(len(v[0])):
                if not v[_COMMITTED][r]:
                    continue
                slot, pos, tok = int(v[_SLOT][r]), int(v[_POS][r]), int(v[_TOK][r])
                found = by_slot.get(slot)
                if found is None:
                    continue
                req, plen = found
                k = pos + 1 - plen
                if k < 0:
                    continue
                conf, ent, lse, pred = v[CONF][r], v[ENT][r], v[LSE][r], v[PRED][r]
                ch = v[_CHOSEN][r]
                if tok == pred:
                    lp = _log_conf(conf)
                elif not math.isnan(ch):
                    lp = ch / t - lse
                else:
                    lp = None
                req.entries.append((k, tok, conf, ent, lp, step, t))

    def _commit_ready(self, req: Request, final: bool) -> None:
        while req.entries:
            k, tok, conf, ent, lp, step, t = req.entries.popleft()
            if k < len(req.confidence):
                continue  # already committed (a resumed request's re-prefill)
            if k == len(req.tokens):
                req.tokens.append(tok)
            self._commit(req, k, conf, ent, lp, step, t)
            req.n_known = len(req.confidence)


# --------------------------------------------------------------------------- the processor

_BASES: tuple[type, ...] = (V1LogitsProcessor,) + (
    (V2LogitsProcessor,) if V2LogitsProcessor is not None else ()
)


class CalibratedLogitsProcessor(*_BASES):
    """Per-token confidence, entropy and exact token log-probabilities inside vLLM.

    Load it with ``LLM(..., logits_processors=[CalibratedLogitsProcessor])``, the server's
    ``--logits-processors mllmcal.integrations.vllm:CalibratedLogitsProcessor`` or the
    ``vllm.logits_processors`` entry point that installing mllmcal registers. It observes
    only (the logits it returns are the ones it got), except for requests that ask it to
    apply the calibration temperature to sampling. See
    :mod:`mllmcal.integrations.vllm` for what it records and how to configure it.

    vLLM calls it as ``(vllm_config, device, is_pin_memory)`` in the V1 model runner and as
    ``(vllm_config, req_states)`` in Model Runner V2; it is a subclass of both interfaces.
    """

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        extra = getattr(vllm_config, "additional_config", None)
        overrides = extra.get("mllmcal") if isinstance(extra, dict) else None
        cfg = Config.from_env(overrides)
        self.config = cfg
        self.runner = "v2" if ("req_states" in kwargs or (len(args) == 1 and not kwargs)) else "v1"
        writer = _writer_rank()
        if self.runner == "v2":
            req_states = kwargs["req_states"] if "req_states" in kwargs else args[0]
            self.tracker: Tracker = V2Tracker(cfg, req_states, writer)
        else:
            device = kwargs["device"] if "device" in kwargs else args[0]
            self.tracker = V1Tracker(cfg, torch.device(device), writer)
        if cfg.enabled:
            self.tracker.start()
        # Engine shutdown drops the processor: write whatever is still open then (and at
        # interpreter exit, for engines that are never garbage-collected).
        weakref.finalize(self, self.tracker.close)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        rid = extra.get("mllmcal_id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise ValueError(f"extra_args['mllmcal_id'] must be a string or int, got {rid!r}")
        for key in ("mllmcal_logprobs", "mllmcal_feedback", "mllmcal_apply_temperature"):
            # Over HTTP, vllm_xargs turns JSON true/false into 1/0.
            if key in extra and extra[key] not in (True, False, 0, 1):
                raise ValueError(f"extra_args[{key!r}] must be true or false, got {extra[key]!r}")
        pos = extra.get("mllmcal_feedback_position", 0)
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
            raise ValueError(
                f"extra_args['mllmcal_feedback_position'] must be an int >= 0, got {pos!r}")

    def is_argmax_invariant(self) -> bool:
        # False although the logits are untouched: V1 skips argmax-invariant processors
        # for all-greedy batches, and it would also hand them logits already divided by
        # the sampling temperature.
        return False

    # V1
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.config.enabled:
            self.tracker.update_state(batch_update)

    # V1 (logits) and V2 (logits, ctx)
    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self.config.enabled:
            return logits
        if ctx is None:
            return self.tracker.apply(logits)
        return self.tracker.apply(logits, ctx)

    # V2
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        if not self.config.enabled:
            return False
        return self.tracker.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        return None

    def flush(self, *, end_active: bool = False) -> int:
        """Drain now (see :meth:`Tracker.flush`); returns the number of records written."""
        return self.tracker.flush(end_active=end_active)
