"""``transformers`` integration: calibrated per-token confidence during ``generate``, and
teacher-forced next-token calibration over a corpus.

:class:`CalibratedLogitsProcessor` is passed as ``model.generate(...,
logits_processor=[proc])``. In every decode step it makes one fused
:func:`mllmcal.token_stats` call on the scores transformers hands over, which also writes
``z = scores / T`` in place (one pass over ``[B, V]``), and keeps ``[B]`` device tensors
per step: logsumexp, confidence, entropy, prediction. Nothing is synchronised with the
host and no history of ``[B, V]`` scores is kept, so its memory is O(B · steps).

How the log-probability of the *chosen* token is obtained exactly
-----------------------------------------------------------------
A logits processor runs before the token is chosen, and by the next step the scores it
saw are gone. Storing top-k candidates would be exact only for greedy decoding. Instead,
at the first step of each ``generate`` call the processor appends a tiny companion
:class:`~transformers.StoppingCriteria` to that call's stopping-criteria list. Stopping
criteria run in the same step, right after the chosen token is appended to
``input_ids``, while the scaled scores of that step are still alive. The companion
gathers ``z[b, token_b]`` (a ``[B]`` gather) and drops its reference to the scores.
``log p(token) = z_token - logsumexp(z)`` is then exact for greedy decoding and for any
sampling scheme. The cost per step is one gather and one ``isin`` over ``[B]``. The
``[B, V]`` scores are never kept past the step in which transformers itself holds them.

The processor finds the running ``generate`` call by looking at its caller's frames (the
``LogitsProcessorList`` and transformers' ``_sample`` loop). It does this once per call,
plus a cheap identity check per step. The same frames let it:

* reset itself when a new ``generate`` call starts, so one processor can be reused;
* refuse beam search and assisted decoding with a clear error. Their scores are
  per-beam log-probabilities, and candidates can be rejected, so per-token confidence
  is not defined the same way;
* avoid corrupting ``output_logits=True``. When it is the first processor, the tensor
  it gets *is* the raw-logits copy that transformers stores, so for that call it writes
  ``z`` to a new tensor instead of in place. That is one ``[B, V]`` allocation per step,
  the same as transformers' own ``TemperatureLogitsWarper``.

Called outside ``generate`` (a hand-written decode loop), the processor still records
statistics. Call :meth:`CalibratedLogitsProcessor.record_tokens` with each chosen token to
get token log-probabilities, and :meth:`CalibratedLogitsProcessor.reset` between
sequences.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria

from ..ops import check_scalar_temperature, token_stats

__all__ = ["CalibratedLogitsProcessor", "score_tokens", "SEQUENCE_CONFIDENCE_KINDS"]

SEQUENCE_CONFIDENCE_KINDS = ("product", "mean", "min")
# transformers' decoding loops that call logits processors; only `_sample` (greedy and
# multinomial sampling) produces one token per row per step from one distribution.
_DECODING_LOOPS = {
    "_sample",
    "_beam_search",
    "_group_beam_search",
    "_constrained_beam_search",
    "_assisted_decoding",
    "_contrastive_search",
    "_dola_decoding",
}


_PLIST_CALL = LogitsProcessorList.__call__.__code__


class _TokenTracker(StoppingCriteria):
    """Companion stopping criterion: records the token chosen in this step; never stops."""

    def __init__(self, proc: CalibratedLogitsProcessor) -> None:
        # A weak reference: the criteria list must not keep the processor's records alive.
        self._proc = weakref.ref(proc)
        self._never: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        proc = self._proc()
        if proc is not None:
            proc.record_tokens(input_ids[:, -1])
        if self._never is None or self._never.shape[0] != input_ids.shape[0]:
            self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._never


@dataclass
class _Run:
    """Records of one ``generate`` call (or one manual decode loop); all tensors ``[B]``."""

    batch: int
    prompt_len: int
    device: torch.device
    plist_ref: Any = None  # weakref to the run's LogitsProcessorList; None in manual mode
    out_of_place: bool = False
    eos: torch.Tensor | None = None
    lse: list[torch.Tensor] = field(default_factory=list)
    confidence: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    prediction: list[torch.Tensor] = field(default_factory=list)
    valid: list[torch.Tensor] = field(default_factory=list)
    alive: list[torch.Tensor] = field(default_factory=list)  # row still generating at step t
    z_token: list[torch.Tensor] = field(default_factory=list)  # z of the chosen token
    tokens: list[torch.Tensor] = field(default_factory=list)
    alive_now: torch.Tensor | None = None
    pending_z: torch.Tensor | None = None  # this step's scaled scores, until its token is seen
    request_ids: list[Hashable] | None = None

    @property
    def n_steps(self) -> int:
        return len(self.lse)


def _new_state(n_bins: int, device: torch.device | None):
    try:
        from ..calibration import CalibrationState
    except ImportError as exc:  # the calibration layer is optional for token statistics
        raise ImportError(
            "correctness feedback needs mllmcal.calibration.CalibrationState, which could not "
            f"be imported: {exc}"
        ) from exc
    return CalibrationState(n_bins=n_bins, device=device)


class CalibratedLogitsProcessor(LogitsProcessor):
    """Temperature-calibrate the next-token distribution and record its confidence, per step.

    Pass it as ``model.generate(..., logits_processor=[proc])``. It returns
    ``scores / temperature`` and changes nothing else. In every step it records ``[B]``
    device tensors: confidence ``max softmax(z)``, entropy (nats), logsumexp and the argmax
    of ``z = scores / T``. All of them are on the *calibrated full distribution*: the
    scores as they reach this processor (after any processor placed before it, e.g.
    repetition penalty or ``min_new_tokens``), divided by ``T``, before any warper that
    runs after it (top-k, top-p, the sampling ``temperature`` of the generation config).

    Args:
        temperature: calibration temperature ``T > 0`` (e.g. from
            ``mllmcal.fit_temperature``). May be changed between ``generate`` calls.
        n_bins: bins of the calibration histogram fed by :meth:`add_feedback`.
        eos_token_id: end-of-sequence id(s). Defaults to the generation config's. Positions
            after a row's first EOS are masked.
        sequence_confidence: how :meth:`add_feedback` turns a row's token probabilities into
            one confidence: ``"product"`` (joint probability of the generated answer),
            ``"mean"`` (geometric mean token probability) or ``"min"``.
        inplace: write ``z`` into the scores tensor it receives. ``None`` (default) does
            so unless that tensor is the raw-logits copy stored for ``output_logits=True``.
        backend: backend of :func:`mllmcal.token_stats`.
        max_pending: how many finished rows may wait for feedback. Past that, the oldest
            are dropped with a warning.

    Example:
        >>> proc = CalibratedLogitsProcessor(temperature=1.3)          # doctest: +SKIP
        >>> out = model.generate(**inputs, logits_processor=[proc],
        ...                      return_dict_in_generate=True)        # doctest: +SKIP
        >>> proc.token_logprobs(out.sequences)   # [B, new_tokens], NaN after EOS  # doctest: +SKIP
    """

    def __init__(
        self,
        temperature: float = 1.0,
        n_bins: int = 15,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        sequence_confidence: str = "product",
        inplace: bool | None = None,
        backend: str = "auto",
        max_pending: int = 100_000,
    ) -> None:
        self.temperature = check_scalar_temperature(temperature)
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if sequence_confidence not in SEQUENCE_CONFIDENCE_KINDS:
            raise ValueError(
                f"sequence_confidence must be one of {SEQUENCE_CONFIDENCE_KINDS}, "
                f"got {sequence_confidence!r}"
            )
        self.n_bins = int(n_bins)
        self.eos_token_id = (
            None if eos_token_id is None
            else [int(eos_token_id)] if isinstance(eos_token_id, int)
            else [int(e) for e in eos_token_id]
        )
        self.sequence_confidence_kind = sequence_confidence
        self.inplace = inplace
        self.backend = backend
        self.max_pending = int(max_pending)
        self.request_ids: list[Hashable] | None = None
        self._run: _Run | None = None
        self._last_run: _Run | None = None
        self._state = None
        # Running token-level totals of finished runs, folded on device when a run ends:
        # [count, Σ confidence, Σ entropy] in fp64 and an int64 confidence histogram.
        self._totals: torch.Tensor | None = None
        self._token_hist: torch.Tensor | None = None
        self._n_runs = 0
        self._n_steps_total = 0
        # request id -> (its run while running, then the run's [B] confidences; row),
        # oldest first.
        self._pending: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._n_feedback = 0

    # ------------------------------------------------------------------ hot path

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Scale ``scores`` ``[B, V]`` (fp32, as transformers passes them) by ``1/T``, record
        ``[B]`` statistics, and return the scaled scores. No host synchronisation."""
        run = self._run_for(input_ids, scores)
        t = self.temperature
        if t == 1.0:
            z, out = scores, None
        elif run.out_of_place:
            z = out = torch.empty_like(scores)
        else:
            z = out = scores
        s = token_stats(scores, temperature=t, scaled_out=out, backend=self.backend, validate=False)
        run.lse.append(s.logsumexp)
        run.confidence.append(s.confidence)
        run.entropy.append(s.entropy)
        run.prediction.append(s.prediction)
        run.valid.append(s.valid)
        run.alive.append(run.alive_now)
        run.pending_z = z
        return z

    def record_tokens(self, tokens: torch.Tensor) -> None:
        """Record the tokens ``[B]`` (int64, on the scores' device) chosen in the current
        step. Inside ``generate`` the companion stopping criterion calls this; in a
        hand-written loop call it after choosing each token. No host synchronisation."""
        run = self._run
        if run is None or run.pending_z is None:
            raise RuntimeError(
                "record_tokens() called without a preceding processor call for this step"
            )
        z = run.pending_z
        run.pending_z = None  # the [B, V] scores are not kept past their step
        tok = tokens.reshape(-1).to(device=z.device, dtype=torch.long)
        if tok.shape[0] != run.batch:
            raise ValueError(f"expected {run.batch} tokens, got {tok.shape[0]}")
        # Finished rows receive the pad id, which may lie outside the vocabulary; they are
        # masked anyway, so clamping only keeps the gather in bounds.
        idx = tok.clamp(0, z.shape[1] - 1)
        run.z_token.append(z.gather(1, idx[:, None]).squeeze(1))
        run.tokens.append(tok.clone())
        if run.eos is not None:
            run.alive_now = run.alive_now & ~torch.isin(tok, run.eos)

    # ------------------------------------------------------------------ run bookkeeping

    def _run_for(self, input_ids: torch.Tensor, scores: torch.Tensor) -> _Run:
        """The run this call belongs to; starts a new one when a new ``generate`` begins."""
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, V], got shape {tuple(scores.shape)}")
        plist, plist_frame = self._calling_list()
        run = self._run
        if run is not None and (
            (plist is not None and run.plist_ref is not None and run.plist_ref() is plist)
            or (plist is None and run.plist_ref is None)
        ):
            if scores.shape[0] != run.batch:
                raise ValueError(
                    f"batch size changed from {run.batch} to {scores.shape[0]} within one run; "
                    "call proc.reset() between independent decode loops"
                )
            if run.pending_z is not None:
                # Manual loop that did not report the previous token: its log-prob is lost.
                run.pending_z = None
                run.z_token.append(torch.full_like(run.lse[-1], float("nan")))
                run.tokens.append(torch.full_like(run.prediction[-1], -1))
            return run
        self._finish_run()
        run = _Run(batch=scores.shape[0], prompt_len=input_ids.shape[-1], device=scores.device)
        run.alive_now = torch.ones(run.batch, dtype=torch.bool, device=scores.device)
        eos_ids = self.eos_token_id
        if plist is not None:
            run.plist_ref = weakref.ref(plist)
            eos_ids, run.out_of_place = self._attach_to_generate(plist_frame, scores, eos_ids)
        if self.inplace is not None:
            run.out_of_place = not self.inplace
        if eos_ids is not None:
            run.eos = eos_ids.to(scores.device) if isinstance(eos_ids, torch.Tensor) else (
                torch.tensor(eos_ids, dtype=torch.long, device=scores.device)
            )
            run.eos = run.eos.reshape(-1).long()
        if self.request_ids is not None:
            if len(self.request_ids) != run.batch:
                raise ValueError(
                    f"proc.request_ids has {len(self.request_ids)} ids but the batch has "
                    f"{run.batch} rows"
                )
            run.request_ids, self.request_ids = list(self.request_ids), None
            # Addressable at once (feedback may come before the next run starts); the
            # run's records are swapped for its [B] confidences when the run ends.
            for row, rid in enumerate(run.request_ids):
                self._pending[rid] = (run, row)
                self._pending.move_to_end(rid)
            self._trim_pending()
        self._run = run
        return run

    def _calling_list(self) -> tuple[LogitsProcessorList | None, Any]:
        """The ``LogitsProcessorList`` that called this processor (and its frame), if any."""
        f = sys._getframe(3)
        for _ in range(3):
            if f is None:
                break
            if f.f_code is _PLIST_CALL:
                owner = f.f_locals.get("self")
                if isinstance(owner, LogitsProcessorList) and any(p is self for p in owner):
                    return owner, f
            f = f.f_back
        return None, None

    def _attach_to_generate(self, plist_frame: Any, scores: torch.Tensor, eos_ids: Any):
        """At the first step of a ``generate`` call: refuse unsupported decoding, install the
        token tracker, find the EOS ids, and decide whether writing in place is safe."""
        f = plist_frame.f_back
        for _ in range(4):
            if f is None or f.f_code.co_name in _DECODING_LOOPS:
                break
            f = f.f_back
        if f is None or f.f_code.co_name not in _DECODING_LOOPS:
            warnings.warn(
                "CalibratedLogitsProcessor: could not find transformers' decoding loop; token "
                "log-probabilities need proc.record_tokens(tokens) after every step",
                RuntimeWarning,
                stacklevel=4,
            )
            return eos_ids, False
        mode = f.f_code.co_name
        if mode != "_sample":
            raise ValueError(
                f"CalibratedLogitsProcessor supports greedy decoding and sampling only, but "
                f"generate() is running {mode!r} (beam search, assisted or contrastive "
                "decoding). Their scores are per-beam log-probabilities or candidates that can "
                "be rejected, so per-token confidence is not tracked; use num_beams=1 and no "
                "assistant model."
            )
        loc = f.f_locals
        try:
            criteria = loc.get("stopping_criteria")
            if criteria is None:
                raise RuntimeError("transformers' _sample loop has no `stopping_criteria`")
            criteria.append(_TokenTracker(self))
            if eos_ids is None:
                gc = loc.get("generation_config")
                eos_ids = getattr(gc, "_eos_token_tensor", None)
                if eos_ids is None and getattr(gc, "eos_token_id", None) is not None:
                    e = gc.eos_token_id
                    eos_ids = [e] if isinstance(e, int) else list(e)
            # With output_logits=True transformers stores the very tensor it passes to the
            # first processor; scaling it in place would change the returned raw logits.
            out_of_place = loc.get("raw_logits") is not None and loc.get("next_token_logits") is scores
        finally:
            if isinstance(loc, dict):
                # Before Python 3.13, f_locals is a snapshot cached on the frame; clearing it
                # drops our references to the loop's tensors (model outputs) right away.
                loc.clear()
            del loc
        return eos_ids, out_of_place

    def reset(self) -> None:
        """End the current run (its rows stay available for feedback) and start afresh at
        the next call. ``generate`` calls do this automatically."""
        self._finish_run()

    def _finish_run(self) -> None:
        run = self._run
        if run is None:
            return
        self._run = None
        run.pending_z = None
        if run.n_steps == 0:
            return
        self._fold_token_totals(run)
        self._n_runs += 1
        self._n_steps_total += run.n_steps
        if run.request_ids is not None:
            mine = [rid for rid in run.request_ids if self._pending.get(rid, (None,))[0] is run]
            if mine:
                conf = self._sequence_confidence_of(run, self.sequence_confidence_kind)
                for rid in mine:
                    self._pending[rid] = (conf, self._pending[rid][1])
        self._last_run = run

    def _trim_pending(self) -> None:
        dropped = 0
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            dropped += 1
        if dropped:
            warnings.warn(
                f"CalibratedLogitsProcessor: dropped {dropped} rows that waited too long for "
                f"feedback (max_pending={self.max_pending})",
                RuntimeWarning,
                stacklevel=3,
            )

    def _run_totals(self, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
        """``[count, Σ conf, Σ entropy]`` (fp64) and the int64 ``[n_bins]`` confidence
        histogram of a run's alive, valid token rows."""
        conf = torch.stack(run.confidence)
        keep = torch.stack(run.alive) & torch.stack(run.valid)
        c = torch.where(keep, conf, torch.zeros_like(conf)).double()
        e = torch.where(keep, torch.stack(run.entropy), torch.zeros_like(conf)).double()
        totals = torch.stack([keep.double().sum(), c.sum(), e.sum()])
        bins = torch.floor(conf.nan_to_num(0.0) * self.n_bins).long().clamp_(0, self.n_bins - 1)
        hist = torch.zeros(self.n_bins, dtype=torch.long, device=conf.device)
        hist.index_add_(0, bins.reshape(-1), keep.reshape(-1).long())
        return totals, hist

    def _fold_token_totals(self, run: _Run) -> None:
        totals, hist = self._run_totals(run)
        if self._totals is None or self._totals.device != totals.device:
            self._totals, self._token_hist = totals, hist
        else:
            self._totals = self._totals + totals
            self._token_hist = self._token_hist + hist

    # ------------------------------------------------------------------ results

    def _latest(self) -> _Run:
        run = self._run if self._run is not None else self._last_run
        if run is None or run.n_steps == 0:
            raise RuntimeError("no decode step has been recorded yet; run model.generate first")
        return run

    def _logprob_matrix(self, run: _Run, n: int) -> torch.Tensor:
        """``[B, n]`` log p of the chosen tokens, NaN where a row had already finished."""
        if n > len(run.z_token):
            raise RuntimeError(
                f"the tokens of {n - len(run.z_token)} step(s) were not recorded; outside "
                "generate(), call proc.record_tokens(next_tokens) after every step"
            )
        if n == 0:
            return torch.empty(run.batch, 0, device=run.device)
        lp = torch.stack(run.z_token[:n]) - torch.stack(run.lse[:n])
        alive = torch.stack(run.alive[:n])
        return torch.where(alive, lp, torch.full_like(lp, float("nan"))).T.contiguous()

    def token_logprobs(self, sequences: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probability of each generated token under the calibrated full distribution.

        Args:
            sequences: ``out.sequences`` ``[B, prompt + new]`` of the latest ``generate``
                call (optional). It fixes the number of new tokens, and it is checked
                against the tokens the processor saw.

        Returns:
            fp32 ``[B, new_tokens]`` on the scores' device, laid out like
            ``model.compute_transition_scores(sequences, scores, normalize_logits=True)``:
            column ``t`` is token ``sequences[:, prompt + t]`` and holds
            ``log_softmax(scores_t / T)[token]``. Positions after a row's first EOS (the
            padding of finished rows) are NaN.
        """
        run = self._latest()
        n = run.n_steps
        if sequences is not None:
            if sequences.dim() != 2 or sequences.shape[0] != run.batch:
                raise ValueError(
                    f"sequences must be [{run.batch}, L], got shape {tuple(sequences.shape)}"
                )
            n = sequences.shape[1] - run.prompt_len
            if not 1 <= n <= run.n_steps:
                raise ValueError(
                    f"sequences have {sequences.shape[1]} positions but the latest run had a "
                    f"{run.prompt_len}-token prompt and {run.n_steps} steps; pass the output "
                    "of the generate call this processor took part in"
                )
        lp = self._logprob_matrix(run, n)
        if sequences is not None and n:
            seen = torch.stack(run.tokens[:n]).T.to(sequences.device)
            gen = sequences[:, run.prompt_len:]
            alive = torch.stack(run.alive[:n]).T.to(sequences.device)
            if bool(((seen != gen) & alive).any()):
                raise ValueError(
                    "sequences do not match the tokens generated in the latest run"
                )
        return lp

    def sequence_scores(self, sequences: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Sequence-level confidences of the latest run, over each row's unmasked tokens.

        Returns a dict of fp32 ``[B]`` tensors: ``mean_logprob`` (mean token log-prob),
        ``min_prob`` (smallest token probability), ``product`` (joint probability
        ``exp(Σ log p)``), ``mean_prob`` (geometric mean ``exp(mean_logprob)``) and
        ``n_tokens``. Rows without tokens get NaN.
        """
        return _sequence_scores(self.token_logprobs(sequences))

    def sequence_confidence(
        self, sequences: torch.Tensor | None = None, kind: str | None = None
    ) -> torch.Tensor:
        """One confidence in ``[0, 1]`` per row (``[B]`` fp32): ``kind`` is ``"product"``,
        ``"mean"`` (geometric mean token probability) or ``"min"``; default: the
        processor's ``sequence_confidence``."""
        kind = kind or self.sequence_confidence_kind
        if kind not in SEQUENCE_CONFIDENCE_KINDS:
            raise ValueError(f"kind must be one of {SEQUENCE_CONFIDENCE_KINDS}, got {kind!r}")
        s = self.sequence_scores(sequences)
        return {"product": s["product"], "mean": s["mean_prob"], "min": s["min_prob"]}[kind]

    def _sequence_confidence_of(self, run: _Run, kind: str) -> torch.Tensor:
        s = _sequence_scores(self._logprob_matrix(run, run.n_steps))
        return {"product": s["product"], "mean": s["mean_prob"], "min": s["min_prob"]}[kind]

    def step_records(self) -> dict[str, torch.Tensor]:
        """The latest run's per-step records, each ``[B, steps]`` on the scores' device:
        ``confidence``, ``entropy``, ``logsumexp`` (fp32), ``prediction`` (int64),
        ``alive`` (bool; False once a row has finished)."""
        run = self._latest()
        return {
            "confidence": torch.stack(run.confidence).T,
            "entropy": torch.stack(run.entropy).T,
            "logsumexp": torch.stack(run.lse).T,
            "prediction": torch.stack(run.prediction).T,
            "alive": torch.stack(run.alive).T,
        }

    def nbytes(self) -> int:
        """Bytes of device memory held by the records (current and latest run) and the
        running totals: O(B · steps), independent of the vocabulary."""
        storages: dict[int, int] = {}
        runs = [r for r in (self._run, self._last_run) if r is not None]
        tensors = [t for t in (self._totals, self._token_hist) if t is not None]
        for r in runs:
            for name in ("lse", "confidence", "entropy", "prediction", "valid", "alive",
                         "z_token", "tokens"):
                tensors.extend(getattr(r, name))
        for t in tensors:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())

    # ------------------------------------------------------------------ monitoring

    @property
    def state(self):
        """The :class:`mllmcal.CalibrationState` fed by :meth:`add_feedback` (created on
        first use, on the device of the latest run)."""
        if self._state is None:
            run = self._run if self._run is not None else self._last_run
            self._state = _new_state(self.n_bins, run.device if run is not None else None)
        return self._state

    def add_feedback(
        self, key: Hashable | Sequence[Hashable], correct: bool | Sequence[bool] | torch.Tensor
    ) -> None:
        """Report whether generated answers were correct, possibly long after generation.

        Args:
            key: a request id set through ``proc.request_ids = [...]`` before the
                ``generate`` call, or an ``int`` row of the latest run; or a list of them.
            correct: one bool per key.

        The row's sequence confidence (see ``sequence_confidence``) and ``correct`` go into
        :attr:`state`. A request id is consumed by its feedback.
        """
        keys = list(key) if isinstance(key, (list, tuple)) else [key]
        corr = torch.as_tensor(correct).reshape(-1).bool()
        if corr.numel() != len(keys):
            raise ValueError(f"got {len(keys)} keys but {corr.numel()} correctness values")
        confs = []
        for k in keys:
            if k in self._pending:
                source, row = self._pending.pop(k)
                conf = (
                    self._sequence_confidence_of(source, self.sequence_confidence_kind)
                    if isinstance(source, _Run) else source
                )
            elif isinstance(k, int) and not isinstance(k, bool):
                run = self._latest()
                if not -run.batch <= k < run.batch:
                    raise IndexError(f"row {k} is outside the latest batch of {run.batch}")
                if run.request_ids is not None and run.request_ids[k] in self._pending:
                    self._pending.pop(run.request_ids[k])
                conf = self._sequence_confidence_of(run, self.sequence_confidence_kind)
                row = k
            else:
                raise KeyError(f"no generated row is waiting for feedback under id {k!r}")
            confs.append(conf[row : row + 1])
        conf = torch.cat(confs)
        self.state.update(conf, corr.to(conf.device))
        self._n_feedback += len(keys)

    def token_summary(self) -> dict[str, Any]:
        """Token-level summary over every step seen so far, the running one included:
        ``tokens``, ``mean_confidence``, ``mean_entropy`` and ``confidence_histogram``
        (``n_bins`` counts). Reads device tensors (a host sync) and never blocks
        generation."""
        totals, hist = self._totals, self._token_hist
        run = self._run
        if run is not None and run.n_steps:
            t, h = self._run_totals(run)
            totals = t if totals is None else totals + t.to(totals.device)
            hist = h if hist is None else hist + h.to(hist.device)
        if totals is None:
            return {"tokens": 0, "mean_confidence": float("nan"), "mean_entropy": float("nan"),
                    "confidence_histogram": [0] * self.n_bins}
        count, sc, se = totals.tolist()
        return {
            "tokens": int(count),
            "mean_confidence": sc / count if count else float("nan"),
            "mean_entropy": se / count if count else float("nan"),
            "confidence_histogram": hist.tolist(),
        }

    def snapshot(self) -> dict[str, Any]:
        """Plain-Python summary for logs and dashboards: temperature, runs and steps seen,
        the token summary, rows waiting for feedback, feedback received, and the
        calibration metrics of :attr:`state` (None before any feedback)."""
        running = self._run is not None and self._run.n_steps > 0
        snap: dict[str, Any] = {
            "temperature": self.temperature,
            "n_bins": self.n_bins,
            "runs": self._n_runs + int(running),
            "steps": self._n_steps_total + (self._run.n_steps if running else 0),
            **self.token_summary(),
            "pending_feedback": len(self._pending),
            "feedback": self._n_feedback,
            "calibration": None,
        }
        if self._state is not None and self._n_feedback:
            st = self._state
            snap["calibration"] = {
                "count": int(st.count),
                "accuracy": float(st.accuracy()),
                "ece": float(st.ece(norm="l1")),
                "ece_l2": float(st.ece(norm="l2")),
                "mce": float(st.ece(norm="max")),
            }
        return snap


def _sequence_scores(lp: torch.Tensor) -> dict[str, torch.Tensor]:
    keep = ~torch.isnan(lp)
    n = keep.sum(-1)
    total = torch.where(keep, lp, torch.zeros_like(lp)).sum(-1)
    lo = torch.where(keep, lp, torch.full_like(lp, float("inf"))).amin(-1) if lp.shape[-1] else (
        torch.full(lp.shape[:-1], float("inf"), device=lp.device)
    )
    nan = torch.full_like(total, float("nan"))
    has = n > 0
    mean = torch.where(has, total / n.clamp(min=1), nan)
    return {
        "mean_logprob": mean,
        "mean_prob": torch.exp(mean),
        "min_prob": torch.where(has, torch.exp(lo), nan),
        "product": torch.where(has, torch.exp(total), nan),
        "n_tokens": n,
    }


# ---------------------------------------------------------------------- teacher forcing


def _text_config(model: torch.nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _final_logit_transform(model: torch.nn.Module):
    """Post-``lm_head`` transforms some causal LMs apply in ``forward``; the chunked path
    calls ``lm_head`` itself, so it must apply them too."""
    cfg = _text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)

    def f(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None and scale != 1.0:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return f


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    state: Any = None,
    chunk_size: int | None = None,
    *,
    temperature: float = 1.0,
    n_bins: int = 15,
    ignore_index: int = -100,
    **model_kwargs: Any,
):
    """Teacher-forced next-token calibration of ``model`` on a batch, into a CalibrationState.

    Position ``i`` predicts token ``i + 1``: the target of position ``i`` is
    ``labels[:, i + 1]`` (the Hugging Face convention, labels aligned with ``input_ids``).
    Without ``labels``, the targets are ``input_ids`` where ``attention_mask`` is 1 and
    the token is not an image placeholder (``config.image_token_id`` /
    ``image_token_index``). Targets equal to ``ignore_index`` are skipped.

    The model body runs once. Its last hidden state ``[B, L, H]`` is then sent through the
    output embedding ``chunk_size`` positions at a time, and each ``[B, chunk, V]`` block
    (in the model's dtype) goes to ``state.update_logits``. No ``[B, L, V]`` logits tensor
    exists at once, in fp32 or otherwise. Known post-``lm_head`` transforms
    (``logit_scale``, ``final_logit_softcapping``) are applied. Models without a separate
    base model / output embedding fall back to one full forward (``chunk_size`` ignored).

    Args:
        model: a causal LM or a LLaVA-style model (``pixel_values`` etc. go in
            ``model_kwargs``), in eval mode.
        input_ids: int64 ``[B, L]``.
        attention_mask: ``[B, L]`` 0/1, optional.
        labels: int64 ``[B, L]`` aligned with ``input_ids``, optional.
        state: a ``CalibrationState`` to add to. By default a new one with ``n_bins``
            bins on the model's device.
        chunk_size: positions per ``lm_head`` block. By default it is chosen so that a
            block has about 2**24 logits.
        temperature: ``T > 0`` applied to the logits before the statistics.

    Returns:
        The ``CalibrationState`` (``state`` itself when given).
    """
    temperature = check_scalar_temperature(temperature)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    b, length = input_ids.shape
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != (b, length):
            raise ValueError(f"{name} must have the shape of input_ids {(b, length)}, got {tuple(t.shape)}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = input_ids.device
    if state is None:
        state = _new_state(n_bins, device)

    if labels is None:
        target = input_ids.clone()
        if attention_mask is not None:
            target[attention_mask == 0] = ignore_index
        for cfg in (model.config, _text_config(model)):
            for attr in ("image_token_id", "image_token_index", "video_token_id"):
                tid = getattr(cfg, attr, None)
                if isinstance(tid, int):
                    target[input_ids == tid] = ignore_index
    else:
        target = labels.to(device=device, dtype=torch.long)
    # Shift: position i is scored against token i + 1; the last position has no target.
    target = torch.cat(
        [target[:, 1:], torch.full((b, 1), ignore_index, dtype=torch.long, device=device)], dim=1
    )
    if length == 0:
        return state

    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits
        state.update_logits(logits, target, temperature=temperature)
        return state

    hidden = base(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
    ).last_hidden_state
    vocab = head.weight.shape[0] if hasattr(head, "weight") else _text_config(model).vocab_size
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // max(1, b * vocab))
    transform = _final_logit_transform(model)
    for p0 in range(0, length, int(chunk_size)):
        p1 = min(length, p0 + int(chunk_size))
        tgt = target[:, p0:p1]
        logits = transform(head(hidden[:, p0:p1]))
        state.update_logits(logits, tgt, temperature=temperature)
        del logits
    return state


def iter_score_tokens(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], state: Any = None, **kwargs: Any
):
    """Run :func:`score_tokens` over an iterable of batches (dicts with ``input_ids`` and
    optionally ``attention_mask``, ``labels``, ``pixel_values``...), into one state."""
    for batch in batches:
        batch = dict(batch)
        state = score_tokens(model, batch.pop("input_ids"), state=state, **batch, **kwargs)
    return state
