"""The ``transformers`` logits processor: per-token confidence during ``generate``.

:class:`CalibratedLogitsProcessor` goes in ``model.generate(..., logits_processor=[proc])``
and uses only the public ``LogitsProcessor`` interface: ``__call__(input_ids, scores)``.

What it keeps, and why that is the cheapest exact design
--------------------------------------------------------
A logits processor runs *before* the token of its step is chosen, so the log-probability
of the chosen token needs the step's scores after the choice is known: at the next call
(the token is ``input_ids[:, -1]``) or, for the last step, from ``out.sequences``. Until
then the step's values must survive, and they must survive *unchanged*:

* ``scores`` itself is handed on to the processors placed after this one, which may edit
  it in place (a user's processor, or anything that writes into its input);
* the tensor received may be reused by the processor placed before (one that writes into
  a preallocated output every step) or be transformers' stored ``output_logits`` copy.

So a reference to ``scores`` is not safe, and neither is a gather from it at the next step.
The alternatives: recomputing the step from ``sequences`` means another forward pass, and
a top-k of candidates is exact for greedy decoding only. What remains is a private copy,
and the fused kernel writes it for free: :func:`mllmcal.token_stats` already has a
``scaled_out`` output, so the one pass that computes the statistics also writes
``z = scores / T`` into a ``[B, V]`` buffer this processor owns. One buffer per run,
reused every step (no allocation per step); at the next call one ``[B]`` gather reads
``z[b, token_b]``. Per step: **one fused op and one gather**, no host sync; held memory is
that one buffer plus O(B · steps) ``[B]`` records. (With fp16/bf16 scores and ``T != 1``,
which ``generate`` never passes -- it hands processors fp32 -- ``z`` rounded to the
scores' dtype would not be exact, so the buffer keeps a raw copy instead, one more op.)

The temperature is the calibration temperature of temperature scaling (Guo et al., "On
Calibration of Modern Neural Networks", ICML 2017, https://arxiv.org/abs/1706.04599).
Observe-only by default: it returns ``scores`` untouched. ``scale_scores=True`` returns
``z = scores / T`` instead (a fresh tensor: a copy of the buffer, one more op), for
calibrated sampling; the same as observe-only followed by transformers'
``TemperatureLogitsWarper(T)``.

Runs
----
Consecutive calls form one *run* when the batch and vocabulary stay the same and
``input_ids`` grows by exactly one token per call; anything else starts a new run (a new
``generate`` call always has another prompt length than the previous call's next step,
unless it is fed the previous ``out.sequences``). A ``generate`` call fed the previous
call's ``out.sequences`` looks exactly like the next step of that call, so it is grouped
with it as one run: results stay exact, and :meth:`~CalibratedLogitsProcessor.token_logprobs`
then has one column per token generated since the run began (slice ``[:, -new:]`` for
the latest call). :meth:`~CalibratedLogitsProcessor.reset` starts a new run explicitly.
A merged run whose prompt rows do not match is detected when results are read.

Beam search cannot be followed through the public interface: its processors receive
per-beam log-probabilities and beams are reordered between steps. When the sequences
handed back have fewer rows than the processor saw, the error says so. Assisted decoding
(candidate tokens that can be rejected) is not supported either; its rejected candidates
show up as ``sequences`` that do not match what the processor saw, which is an error.

Greedy decoding and sampling are supported, with any processors and warpers around it,
and on every transformers 5.x release the tests run on (the pinned one and the newest).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor

from ... import _contract as C
from ...ops import TokenStats, check_scalar_temperature, token_stats
from .._feedback import SEQUENCE_CONFIDENCE_KINDS, pick_confidence, sequence_scores
from .feedback import FeedbackMonitor

__all__ = ["CalibratedLogitsProcessor"]


@dataclass(eq=False)
class _Run:
    """Records of one run; every list entry is a ``[B]`` (or ``[7, B]``) device tensor."""

    batch: int
    vocab: int
    prompt_len: int
    temperature: float
    first_ids: torch.Tensor  # input_ids of the first call (the prompt), by reference
    last_ids: torch.Tensor  # input_ids of the latest call, by reference
    buf: torch.Tensor | None  # [B, V]: z of the latest step (or raw scores), ours alone
    raw_buf: bool  # buf holds raw scores: gathered values are divided by T
    stats: list[TokenStats] = field(default_factory=list)  # views of one [7, B] per step
    z_token: list[torch.Tensor] = field(default_factory=list)  # [B, 1] z of the chosen token
    n_final: int | None = None  # steps that produced tokens, once known from sequences
    request_ids: list[Hashable] | None = None

    @property
    def n_steps(self) -> int:
        return len(self.stats)

    @property
    def device(self) -> torch.device:
        return self.first_ids.device if self.buf is None else self.buf.device

    def stacked(self, name: str, n: int | None = None) -> torch.Tensor:
        """``[B, n]`` of one statistic over the first ``n`` steps."""
        return torch.stack([getattr(s, name) for s in self.stats[:n]], dim=1)


class CalibratedLogitsProcessor(LogitsProcessor):
    """Record the calibrated confidence of every decode step, exactly and without host syncs.

    Pass it as ``model.generate(..., logits_processor=[proc])``. In every step it records
    ``[B]`` device tensors of ``z = scores / T``: confidence ``max softmax(z)``, entropy
    (nats), logsumexp and argmax, and keeps what it needs to give the exact
    log-probability of the token that was chosen (see the module docstring). The
    distribution is the *full* one as it reaches this processor: after the processors
    placed before it (repetition penalty, ``min_new_tokens``), before those placed after
    it (top-k, top-p, the sampling temperature), whatever those do to the scores.

    Args:
        temperature: calibration temperature ``T > 0`` (e.g. from
            ``mllmcal.fit_temperature``). May be changed between runs.
        n_bins: bins of the calibration histogram fed by :meth:`add_feedback`.
        eos_token_id: end-of-sequence id(s): positions after a row's first EOS are masked
            (NaN) in the results. The processor cannot see the generation config through
            the public interface; :meth:`for_model` takes them from the model's. Without
            them nothing is masked.
        sequence_confidence: how :meth:`add_feedback` turns a row's token probabilities
            into one confidence: ``"product"``, ``"mean"`` (geometric mean) or ``"min"``.
        scale_scores: return ``scores / T`` (for calibrated sampling) instead of the scores
            unchanged. Never written in place.
        backend: backend of :func:`mllmcal.token_stats`.
        max_pending: rows that may wait for feedback; past that the oldest are dropped.

    Example:
        >>> import torch
        >>> from mllmcal.integrations.transformers import CalibratedLogitsProcessor
        >>> proc = CalibratedLogitsProcessor(temperature=2.0)
        >>> ids = torch.tensor([[5, 6], [7, 8]])               # a hand-written decode loop
        >>> for step in range(3):
        ...     scores = torch.randn(2, 10)                    # [B, V] from the model
        ...     _ = proc(ids, scores)
        ...     ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
        >>> proc.token_logprobs(ids).shape                     # [B, new_tokens]
        torch.Size([2, 3])
        >>> bool((proc.token_logprobs(ids) <= 0).all())
        True
    """

    def __init__(
        self,
        temperature: float = 1.0,
        n_bins: int = 15,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        sequence_confidence: str = "product",
        scale_scores: bool = False,
        backend: str = "auto",
        max_pending: int = 100_000,
    ) -> None:
        self.temperature = check_scalar_temperature(temperature)
        self.monitor = FeedbackMonitor(n_bins, sequence_confidence, max_pending)
        self.eos_token_id = (
            None if eos_token_id is None
            else [int(eos_token_id)] if isinstance(eos_token_id, int)
            else [int(e) for e in eos_token_id]
        )
        self.scale_scores = bool(scale_scores)
        self.backend = backend
        self.request_ids: list[Hashable] | None = None
        self._run: _Run | None = None
        self._last_run: _Run | None = None  # after reset()/finish(), until a new run

    @classmethod
    def for_model(cls, model: Any, temperature: float = 1.0, **kwargs: Any) -> CalibratedLogitsProcessor:
        """A processor with ``eos_token_id`` from ``model.generation_config`` (public)."""
        if "eos_token_id" not in kwargs:
            gc = getattr(model, "generation_config", None)
            kwargs["eos_token_id"] = getattr(gc, "eos_token_id", None)
        return cls(temperature, **kwargs)

    @property
    def n_bins(self) -> int:
        return self.monitor.n_bins

    @property
    def sequence_confidence_kind(self) -> str:
        return self.monitor.sequence_confidence_kind

    # ------------------------------------------------------------------ hot path

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Record step statistics of ``scores`` ``[B, V]`` and return the scores (or
        ``scores / T`` with ``scale_scores``). One fused op and one ``[B]`` gather; no host
        synchronisation."""
        run = self._run
        if run is not None and self._continues(run, input_ids, scores):
            if len(run.z_token) < run.n_steps:
                # The token chosen at the previous step is the newest one in input_ids; the
                # buffer still holds that step's z, and nothing else has written it.
                run.z_token.append(self._gather(run, input_ids[:, -1:]))
            run.last_ids = input_ids
            run.n_final = None
        else:
            run = self._start_run(input_ids, scores)
        t = run.temperature
        returned = scores
        if run.raw_buf:
            run.buf.copy_(scores)
            out = torch.empty_like(scores) if self.scale_scores else None
            s = token_stats(scores, temperature=t, scaled_out=out, backend=self.backend,
                            validate=False)
            returned = scores if out is None else out
        else:
            s = token_stats(scores, temperature=t, scaled_out=run.buf, backend=self.backend,
                            validate=False)
            if self.scale_scores and t != 1.0:
                returned = run.buf.clone()
        run.stats.append(s)  # [B] views of the op's outputs: no copy
        return returned

    @staticmethod
    def _gather(run: _Run, index: torch.Tensor) -> torch.Tensor:
        z = run.buf.gather(1, index)
        return z.float() / run.temperature if run.raw_buf else z

    @staticmethod
    def _continues(run: _Run, input_ids: torch.Tensor, scores: torch.Tensor) -> bool:
        return (
            tuple(scores.shape) == (run.batch, run.vocab)
            and input_ids.dim() == 2
            and input_ids.shape[0] == run.batch
            and input_ids.shape[1] == run.prompt_len + run.n_steps
            and run.buf is not None
            and scores.dtype == run.buf.dtype
            and scores.device == run.buf.device
        )

    def record_tokens(self, tokens: torch.Tensor, *, validate: bool = True) -> None:
        """Give the tokens ``[B]`` chosen at the latest step, in a hand-written loop that
        does not pass the growing ``input_ids`` (``generate`` needs no such call).

        ``validate`` checks that every id lies in ``[0, V)`` (a host sync on GPU).
        """
        run = self._run
        if run is None or run.n_steps == 0 or len(run.z_token) >= run.n_steps:
            raise RuntimeError(
                "record_tokens() needs a processor call for this step whose token is not "
                "recorded yet"
            )
        tok = torch.as_tensor(tokens).reshape(-1).to(device=run.device, dtype=torch.long)
        if tok.shape[0] != run.batch:
            raise ValueError(f"expected {run.batch} tokens, got {tok.shape[0]}")
        if validate:
            bad = (tok < 0) | (tok >= run.vocab)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"token id {int(tok[i])} of row {i} is outside the vocabulary [0, {run.vocab})"
                )
        run.z_token.append(self._gather(run, tok[:, None]))

    # ------------------------------------------------------------------ runs

    def _start_run(self, input_ids: torch.Tensor, scores: torch.Tensor) -> _Run:
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, V], got shape {tuple(scores.shape)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(
                f"input_ids must be [B, L] with B = {scores.shape[0]} (the rows of scores), "
                f"got shape {tuple(input_ids.shape)}"
            )
        self._finish_run()
        self._last_run = None  # results are read from the latest run only
        t = self.temperature = check_scalar_temperature(self.temperature)
        run = _Run(
            batch=scores.shape[0], vocab=scores.shape[1], prompt_len=input_ids.shape[1],
            temperature=t, first_ids=input_ids, last_ids=input_ids,
            buf=torch.empty_like(scores, memory_format=torch.contiguous_format),
            raw_buf=scores.dtype != torch.float32 and t != 1.0,
        )
        if self.request_ids is not None:
            if len(self.request_ids) != run.batch:
                raise ValueError(
                    f"proc.request_ids has {len(self.request_ids)} ids but the batch has "
                    f"{run.batch} rows"
                )
            run.request_ids, self.request_ids = list(self.request_ids), None
            self.monitor.open_rows(run, run.request_ids)
        self.monitor.state_device = scores.device
        self._run = run
        return run

    def reset(self) -> None:
        """End the current run and start a new one at the next call. Its rows stay
        available for feedback when its last tokens are known (see :meth:`finish`)."""
        self._finish_run()

    def _finish_run(self) -> None:
        run = self._run
        if run is None:
            return
        self._run = None
        if run.n_steps == 0:
            return
        totals, hist = self._run_totals(run)
        self.monitor.fold_totals(totals, hist, run.n_final or run.n_steps)
        resolved = run.n_final is not None or len(run.z_token) >= run.n_steps
        if resolved:
            run.buf = None  # every token's z is gathered: the [B, V] buffer is not needed
        if run.request_ids is not None:
            if not resolved:
                self.monitor.close_rows(
                    run, None, "the run ended before its last generated tokens were known; "
                    "call proc.finish(out.sequences) after generate",
                )
            else:
                n = run.n_final if run.n_final is not None else run.n_steps
                conf = pick_confidence(sequence_scores(self._logprob_matrix(run, n)),
                                       self.sequence_confidence_kind)
                self.monitor.close_rows(run, conf)
        self._last_run = run

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """End the run with the ``out.sequences`` of its ``generate`` call: the last tokens
        become known, waiting request ids get their sequence confidence, and the buffer
        is released. Returns :meth:`token_logprobs` of ``sequences``."""
        lp = self.token_logprobs(sequences)
        self._finish_run()
        return lp

    # ------------------------------------------------------------------ results

    def _latest(self) -> _Run:
        run = self._run if self._run is not None else self._last_run
        if run is None or run.n_steps == 0:
            raise RuntimeError("no decode step has been recorded yet; run model.generate first")
        return run

    def _eos(self, device: torch.device) -> torch.Tensor | None:
        if not self.eos_token_id:
            return None
        return torch.tensor(self.eos_token_id, dtype=torch.long, device=device)

    def _alive(self, run: _Run, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """``[B, n]`` bool: the row had not emitted EOS before step t (``tokens`` holds at
        least the first ``n - 1`` generated tokens)."""
        eos = self._eos(tokens.device)
        alive = torch.ones(run.batch, n, dtype=torch.bool, device=tokens.device)
        if eos is None or n <= 1:
            return alive
        is_eos = torch.isin(tokens[:, : n - 1], eos)
        alive[:, 1:] = torch.cumsum(is_eos.long(), dim=1) == 0
        return alive

    def _logprob_matrix(self, run: _Run, n: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, n]`` fp32 log p of the chosen tokens, NaN after a row's first EOS."""
        if n == 0:
            return torch.empty(run.batch, 0, device=run.device)
        z = torch.cat(run.z_token[:n], dim=1)  # [B, n]
        lp = z.float() - run.stacked("logsumexp", n)
        if tokens is None:
            tokens = run.last_ids[:, run.prompt_len:]
        alive = self._alive(run, tokens, n)
        return torch.where(alive, lp, torch.full_like(lp, float("nan")))

    def token_logprobs(self, sequences: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probability of each generated token under the calibrated full distribution.

        Args:
            sequences: ``out.sequences`` ``[B, prompt + new]`` of the latest ``generate``
                call. It gives the tokens of the last step (which no processor call sees)
                and the number of steps that produced tokens, and it is checked against
                the tokens the processor saw. Optional when every step's token is known
                already (a hand-written loop with :meth:`record_tokens`).

        Returns:
            fp32 ``[B, new]`` on the scores' device, laid out like
            ``model.compute_transition_scores(sequences, scores, normalize_logits=True)``:
            column ``t`` holds ``log_softmax(scores_t / T)[token_t]``, exactly as the
            fused kernel computes it. Positions after a row's first EOS are NaN (when
            ``eos_token_id`` is known).
        """
        run = self._latest()
        if sequences is None:
            if len(run.z_token) < run.n_steps:
                raise RuntimeError(
                    "the token chosen at the last step is not known: pass out.sequences, or "
                    "call proc.record_tokens(tokens) after choosing each token"
                )
            return self._logprob_matrix(run, run.n_steps)
        n = self._check_sequences(run, sequences)
        if n == run.n_steps and len(run.z_token) < n:
            run.z_token.append(self._gather(run, sequences[:, -1:].to(run.device)))
        run.n_final = n
        return self._logprob_matrix(run, n, sequences[:, run.prompt_len:].to(run.device))

    def _check_sequences(self, run: _Run, sequences: torch.Tensor) -> int:
        if sequences.dim() != 2:
            raise ValueError(f"sequences must be [B, L], got shape {tuple(sequences.shape)}")
        if sequences.shape[0] != run.batch:
            beams = run.batch // max(sequences.shape[0], 1)
            if sequences.shape[0] and run.batch % sequences.shape[0] == 0 and beams > 1:
                raise ValueError(
                    f"sequences have {sequences.shape[0]} rows but every step had {run.batch}: "
                    f"this looks like beam search (num_beams={beams}), which a logits processor "
                    "cannot follow (scores are per-beam log-probabilities and beams are "
                    "reordered between steps); use num_beams=1"
                )
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
        seq = sequences.to(run.device)
        if not torch.equal(run.last_ids[:, : run.prompt_len], run.first_ids):
            raise ValueError(
                "the latest run merged generate calls with different prompts (a new call "
                "whose prompt was exactly as long as the previous call's next step); call "
                "proc.reset() between such calls"
            )
        m = min(seq.shape[1], run.last_ids.shape[1])
        if not torch.equal(seq[:, :m], run.last_ids[:, :m]):
            raise ValueError("sequences do not match the tokens generated in the latest run")
        return n

    def sequence_scores(self, sequences: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Sequence-level confidences of the latest run over each row's unmasked tokens
        (see :func:`~mllmcal.integrations._feedback.sequence_scores`)."""
        return sequence_scores(self.token_logprobs(sequences))

    def sequence_confidence(
        self, sequences: torch.Tensor | None = None, kind: str | None = None
    ) -> torch.Tensor:
        """One confidence in ``[0, 1]`` per row (``[B]`` fp32): ``kind`` is ``"product"``,
        ``"mean"`` (geometric mean token probability) or ``"min"``; default: the
        processor's ``sequence_confidence``."""
        kind = kind or self.sequence_confidence_kind
        if kind not in SEQUENCE_CONFIDENCE_KINDS:
            raise ValueError(f"kind must be one of {SEQUENCE_CONFIDENCE_KINDS}, got {kind!r}")
        return pick_confidence(self.sequence_scores(sequences), kind)

    def step_records(self) -> dict[str, torch.Tensor]:
        """The latest run's per-step records, each ``[B, steps]`` on the scores' device:
        ``confidence``, ``entropy``, ``logsumexp`` (fp32), ``prediction`` (int64),
        ``alive`` (bool; False once a row has emitted EOS, when ``eos_token_id`` is known)."""
        run = self._latest()
        return {
            "confidence": run.stacked("confidence"),
            "entropy": run.stacked("entropy"),
            "logsumexp": run.stacked("logsumexp"),
            "prediction": run.stacked("prediction"),
            "alive": self._alive(run, run.last_ids[:, run.prompt_len:], run.n_steps),
        }

    def latest_stats(self) -> TokenStats:
        """The :class:`mllmcal.TokenStats` (``[B]`` fields) of the latest step."""
        return self._latest().stats[-1]

    def latest_scaled_scores(self) -> torch.Tensor:
        """``z = scores / T`` ``[B, V]`` of the latest step, valid until the next call: what a
        stopping criterion (which runs right after the token is chosen) can read to keep
        the row of a step it cares about. Read-only: it is the processor's own buffer."""
        run = self._latest()
        if run.buf is None:
            raise RuntimeError("the latest run has ended; its buffer was released")
        if run.raw_buf:
            return run.buf.float() / run.temperature
        return run.buf

    def nbytes(self) -> int:
        """Bytes of device memory the records hold: O(B · steps) plus the one ``[B, V]``
        buffer of the latest step; independent of the number of steps otherwise."""
        storages: dict[int, int] = {}
        for run in {id(r): r for r in (self._run, self._last_run) if r is not None}.values():
            tensors = [run.first_ids, run.last_ids, *run.z_token]
            tensors += [t for s in run.stats for t in (s.logsumexp, s.prediction, s.flags)]
            if run.buf is not None:
                tensors.append(run.buf)
            for t in tensors:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())

    # ------------------------------------------------------------------ monitoring

    def _run_totals(self, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
        """``[count, Σ conf, Σ entropy]`` (fp64) and the int64 ``[n_bins]`` confidence
        histogram of the run's live, valid token rows."""
        n = run.n_final if run.n_final is not None else run.n_steps
        conf, ent = run.stacked("confidence", n), run.stacked("entropy", n)
        keep = self._alive(run, run.last_ids[:, run.prompt_len:], n) & ~torch.isnan(conf)
        c = torch.where(keep, conf, torch.zeros_like(conf)).double()
        e = torch.where(keep, ent, torch.zeros_like(ent)).double()
        totals = torch.stack([keep.double().sum(), c.sum(), e.sum()])
        bins = C.conf_bins(conf.nan_to_num(0.0), self.n_bins)
        hist = torch.zeros(self.n_bins, dtype=torch.long, device=conf.device)
        hist.index_add_(0, bins.reshape(-1), keep.reshape(-1).long())
        return totals, hist

    @property
    def state(self):
        """The :class:`mllmcal.CalibrationState` fed by :meth:`add_feedback`."""
        return self.monitor.state

    def add_feedback(
        self, key: Hashable | Sequence[Hashable], correct: bool | Sequence[bool] | torch.Tensor
    ) -> None:
        """Report whether generated answers were correct, possibly long after generation.

        Args:
            key: a request id set through ``proc.request_ids = [...]`` before the
                ``generate`` call, or an ``int`` row of the latest run; or a list of them.
            correct: one bool per key.

        The row's sequence confidence and ``correct`` go into :attr:`state`. A request id
        is consumed by its feedback. Rows of the running ``generate`` call need their
        last token: call :meth:`finish` (or :meth:`token_logprobs`) with ``out.sequences``
        first.
        """
        keys = list(key) if isinstance(key, (list, tuple)) else [key]
        corr = torch.as_tensor(correct).reshape(-1).bool()
        if corr.numel() != len(keys):
            raise ValueError(f"got {len(keys)} keys but {corr.numel()} correctness values")
        confs = []
        for k in keys:
            entry = self.monitor.take(k)
            if entry is not None:
                source, row = entry.source, entry.row
                conf = self._run_confidence(source) if isinstance(source, _Run) else source
            elif isinstance(k, int) and not isinstance(k, bool):
                run = self._latest()
                if not -run.batch <= k < run.batch:
                    raise IndexError(f"row {k} is outside the latest batch of {run.batch}")
                if run.request_ids is not None:
                    self.monitor.discard(run.request_ids[k])
                conf, row = self._run_confidence(run), k
            else:
                raise KeyError(f"no generated row is waiting for feedback under id {k!r}")
            confs.append(conf[row : row + 1])
        self.monitor.score(torch.cat(confs), corr)

    def _run_confidence(self, run: _Run) -> torch.Tensor:
        n = run.n_final
        if n is None:
            if len(run.z_token) < run.n_steps:
                raise RuntimeError(
                    "the last generated tokens of this run are not known yet: call "
                    "proc.finish(out.sequences) (or proc.token_logprobs(out.sequences)) first"
                )
            n = run.n_steps
        return pick_confidence(sequence_scores(self._logprob_matrix(run, n)),
                               self.sequence_confidence_kind)

    def token_summary(self) -> dict[str, Any]:
        """Token-level summary over every step seen so far, the running run included:
        ``tokens``, ``mean_confidence``, ``mean_entropy`` and ``confidence_histogram``
        (``n_bins`` counts). Reads device tensors (a host sync)."""
        run = self._run
        running = self._run_totals(run) if run is not None and run.n_steps else None
        return self.monitor.token_summary(running)

    def snapshot(self) -> dict[str, Any]:
        """Plain-Python summary for logs and dashboards: temperature, runs and steps seen,
        the token summary, rows waiting for feedback, feedback received, and the
        calibration metrics of :attr:`state` (None before any feedback)."""
        run = self._run
        running = run is not None and run.n_steps > 0
        steps_now = (run.n_final or run.n_steps) if running else 0
        return {
            "temperature": self.temperature,
            "n_bins": self.n_bins,
            "runs": self.monitor.n_runs + int(running),
            "steps": self.monitor.n_steps + steps_now,
            **self.token_summary(),
            "pending_feedback": self.monitor.n_pending,
            "feedback": self.monitor.n_feedback,
            "calibration": self.monitor.calibration(),
        }
