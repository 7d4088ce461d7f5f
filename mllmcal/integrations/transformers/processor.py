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
``z = scores / T`` into a buffer this processor owns. One buffer per run, reused every
step (no allocation per step); at the next call one gather reads ``z[b, token_b]`` and,
from a second plane of column indices, ``token_b`` itself for the checks at read time (a
``[B, 2, V]`` fp32 buffer, see :class:`~.runs._Run`). Per step: **one fused op and one
gather**, no host sync; held memory is that one buffer plus O(B · steps) ``[B]`` records.
(With fp16/bf16 scores, which ``generate`` never passes -- it hands processors fp32 -- the
buffer keeps an fp32 copy of the raw scores instead, one more op: ``z`` rounded to the
scores' dtype would not be exact.)

The temperature is the calibration temperature of temperature scaling (Guo et al., "On
Calibration of Modern Neural Networks", ICML 2017, https://arxiv.org/abs/1706.04599).
Observe-only by default: it returns ``scores`` untouched. ``scale_scores=True`` returns
``z = scores / T`` instead (a fresh tensor: a copy of the buffer, one more op), for
calibrated sampling; the same as observe-only followed by transformers'
``TemperatureLogitsWarper(T)``.

Runs
----
A *run* is what one ``generate`` call records; ``with proc.run(request_ids=...) as run:``
around the call gives its boundary (see :mod:`.runs`). Without a scope, a run ends when
its results are read with ``sequences`` (:meth:`~CalibratedLogitsProcessor.token_logprobs`,
:meth:`~CalibratedLogitsProcessor.finish`), at :meth:`~CalibratedLogitsProcessor.reset`,
or when ``request_ids`` is set; the next call then starts a new one. A call that arrives
while an unread run is open is told apart from that run's next step by shapes alone
(batch, vocabulary, one more token), which is ambiguous (see :mod:`.runs`): it warns once
(``FutureWarning``) when it starts a new run, and a merged run is read only if every
recorded token and the prompt equal ``sequences``.

Beam search cannot be followed through the public interface: beams are reordered between
steps, so a row's scores at one step and its token at the next belong to different beams.
transformers' beam search hands processors a view of a buffer it rebuilds every step;
such input_ids (not contiguous, on a new storage at each call) end the run with an
error (with one step, every beam of a prompt saw the same scores: exact). Sequences with
fewer rows than the processor saw are refused too. Another implementation's reordering
is caught by the recorded tokens unless every token a reordered row received equals the
final sequence's at that step: the recorded tokens prove each step's token, not its
context. Assisted decoding is not supported either.

Greedy decoding and sampling are supported, with any processors and warpers around it,
and on every transformers 5.x release the tests run on (the pinned one and the newest).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from ...ops import TokenStats, check_scalar_temperature, token_stats
from .._feedback import SEQUENCE_CONFIDENCE_KINDS, pick_confidence, sequence_scores
from .feedback import FeedbackMonitor
from .runs import BEAM_SEARCH, MAX_VOCAB, GenerationRun, _Run, check_sequences, eos_ids

__all__ = ["CalibratedLogitsProcessor", "GenerationRun"]

_AMBIGUOUS = (
    "CalibratedLogitsProcessor: a call started a new run while the previous run was open "
    "and unread. Without a run scope, runs are told apart by shapes only: a generate call "
    "whose prompt is exactly as long as the previous call's next step is recorded as that "
    "call's continuation instead. Open `with proc.run(request_ids=...) as run:` around "
    "each generate call (or read each run with proc.finish(out.sequences) first); "
    "telling runs apart by shapes is deprecated"
)


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
        self.eos_token_id = eos_ids(eos_token_id)
        self.scale_scores = bool(scale_scores)
        self.backend = backend
        self._request_ids: list[Hashable] | None = None
        self._run: _Run | None = None  # the run that takes calls now
        self._latest_run: _Run | None = None  # the latest run, taking calls or not
        self._scope: GenerationRun | None = None
        self._warned_ambiguous = False

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

    # ------------------------------------------------------------------ run scopes

    def run(self, request_ids: Sequence[Hashable] | None = None) -> GenerationRun:
        """The scope of one ``generate`` call: ``with proc.run(request_ids=[...]) as run:``;
        ``request_ids`` (one per row, optional) name its rows for :meth:`add_feedback`. See
        :class:`~.runs.GenerationRun` for the rules and the results read after the block."""
        return GenerationRun(self, request_ids)

    def _open_scope(self, scope: GenerationRun) -> None:
        if self._scope is not None:
            raise RuntimeError("a run scope of this processor is already open: one at a time")
        self._run = None  # whatever was taking calls ends here; it stays readable
        self._scope = scope

    def _close_scope(self, scope: GenerationRun) -> None:
        if self._scope is scope:
            self._scope = None
        if self._run is not None and self._run.scope is scope:
            self._run = None

    @property
    def request_ids(self) -> list[Hashable] | None:
        """Ids of the rows of the next run (prefer ``proc.run(request_ids=...)``). Setting
        them ends the current run: the next call starts a new one with these rows."""
        return self._request_ids

    @request_ids.setter
    def request_ids(self, ids: Sequence[Hashable] | None) -> None:
        if self._scope is not None:
            raise RuntimeError("a run scope is open: give its ids as proc.run(request_ids=...)")
        self._request_ids = None if ids is None else list(ids)
        self._run = None

    # ------------------------------------------------------------------ hot path

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Record step statistics of ``scores`` ``[B, V]`` and return the scores (or
        ``scores / T`` with ``scale_scores``). One fused op and one gather; no host
        synchronisation."""
        run = self._run
        if run is not None and self._continues(run, input_ids, scores):
            storage = input_ids.untyped_storage().data_ptr()
            if storage != run.last_storage and not input_ids.is_contiguous():
                self._refuse(run, BEAM_SEARCH)
            if run.n_picked < run.n_steps:
                # The token chosen at the previous step is the newest one in input_ids; the
                # buffer still holds that step's z, and nothing else has written it.
                run.picked.append(run.gather(input_ids[:, -1:]))
            run.last_storage = storage
        else:
            run = self._start_run(input_ids, scores)
        t, z = run.temperature, run.buf[:, 0]
        scale = self.scale_scores and t != 1.0
        if run.raw:
            z.copy_(scores)
            out = torch.empty_like(scores) if scale else None
        else:
            out = z
        s = token_stats(scores, temperature=t, scaled_out=out, backend=self.backend, validate=False)
        run.stats.append(s)  # [B] views of the op's outputs: no copy
        if not scale:
            return scores
        return out if run.raw else z.clone()

    @staticmethod
    def _continues(run: _Run, input_ids: torch.Tensor, scores: torch.Tensor) -> bool:
        return (
            tuple(scores.shape) == (run.batch, run.vocab)
            and input_ids.dim() == 2
            and input_ids.shape[0] == run.batch
            and input_ids.shape[1] == run.prompt_len + run.n_steps
            and run.buf is not None
            and scores.dtype == run.dtype
            and scores.device == run.buf.device
        )

    def record_tokens(self, tokens: torch.Tensor, *, validate: bool = True) -> None:
        """Give the tokens ``[B]`` chosen at the latest step, in a hand-written loop that
        does not pass the growing ``input_ids`` (``generate`` needs no such call).

        ``validate`` checks that every id lies in ``[0, V)`` (a host sync on GPU).
        """
        run = self._run
        if run is None or run.n_steps == 0 or run.n_picked >= run.n_steps:
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
        run.picked.append(run.gather(tok[:, None]))

    # ------------------------------------------------------------------ runs

    def _start_run(self, input_ids: torch.Tensor, scores: torch.Tensor) -> _Run:
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, V], got shape {tuple(scores.shape)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(
                f"input_ids must be [B, L] with B = {scores.shape[0]} (the rows of scores), "
                f"got shape {tuple(input_ids.shape)}"
            )
        b, v = scores.shape
        if v > MAX_VOCAB:
            raise ValueError(f"vocabularies up to {MAX_VOCAB} tokens are supported, got {v}")
        scope, prev = self._scope, self._run
        if scope is not None and scope._record is not None:
            raise ValueError(
                "this call is not the next step of the run of the open `with proc.run()` "
                "block (another prompt or batch, or a call after the run was read): a run "
                "scope holds one generate call; open a new `with proc.run():` for the next"
            )
        ids = scope.request_ids if scope is not None else self._request_ids
        if ids is not None and len(ids) != b:
            raise ValueError(f"request_ids has {len(ids)} ids but the batch has {b} rows")
        if prev is not None and prev.n_steps and scope is None and not self._warned_ambiguous:
            self._warned_ambiguous = True
            warnings.warn(_AMBIGUOUS, FutureWarning, stacklevel=3)
        self._run = None
        if self._latest_run is not None:
            self._close(self._latest_run, release=True)
        t = self.temperature = check_scalar_temperature(self.temperature)
        buf = torch.empty(b, 2, v, dtype=torch.float32, device=scores.device)
        buf[:, 1].copy_(torch.arange(v, dtype=torch.float32, device=scores.device).expand(b, v))
        run = _Run(
            batch=b, vocab=v, prompt_len=input_ids.shape[1], temperature=t, dtype=scores.dtype,
            first_ids=input_ids, last_storage=input_ids.untyped_storage().data_ptr(), buf=buf,
            raw=scores.dtype != torch.float32, scope=scope,
        )
        if scope is not None:
            scope._record = run
        else:
            self._request_ids = None
        if ids is not None:
            run.request_ids = list(ids)
            self.monitor.open_rows(run, run.request_ids)
        self.monitor.device = scores.device  # the calibration state is created there
        self._run = self._latest_run = run
        return run

    def _refuse(self, run: _Run, why: str) -> None:
        """End ``run`` with an error that every read of it repeats."""
        run.error, run.buf, run.closed = why, None, True
        self.monitor.drop_rows(run)
        self._run = None
        raise ValueError(why)

    def reset(self) -> None:
        """End the current run and start a new one at the next call. Its rows waiting for
        feedback are dropped (with a warning) unless its last tokens are known; results
        stay readable with :meth:`token_logprobs` until the next run starts."""
        self._run = None
        if self._latest_run is not None:
            self._close(self._latest_run, release=False)

    def _close(self, run: _Run, release: bool) -> None:
        """Fold ``run``'s totals into the monitor and settle its waiting rows; ``release``
        drops its buffer even when the last step's token is not known (a new run starts)."""
        if run.closed:
            return
        run.closed = True
        if run.n_steps == 0:
            return
        totals, hist = run.totals(self.eos_token_id, self.n_bins)
        self.monitor.fold_totals(totals, hist, run.n_final or run.n_steps)
        if run.resolved or release:
            run.buf = None  # every token's z is gathered (or never will be)
        if run.request_ids is not None:
            if not run.resolved:
                self.monitor.close_rows(
                    run, None, "the run ended before its last generated tokens were known; "
                    "call run.finish(out.sequences) (or proc.finish) after generate",
                )
            else:
                self.monitor.close_rows(run, self._run_confidence(run))

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """End the latest run with the ``out.sequences`` of its ``generate`` call: the last
        tokens become known, waiting request ids get their sequence confidence, and the
        buffer is released. Returns :meth:`token_logprobs` of ``sequences``."""
        return self._token_logprobs(self._latest(), sequences)

    # ------------------------------------------------------------------ results

    def _latest(self) -> _Run:
        run = self._latest_run
        if run is None or run.n_steps == 0:
            raise RuntimeError("no decode step has been recorded yet; run model.generate first")
        run.check()
        return run

    def token_logprobs(self, sequences: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probability of each generated token under the calibrated full distribution.

        Args:
            sequences: ``out.sequences`` ``[B, prompt + new]`` of the latest ``generate``
                call. It gives the tokens of the last step (which no processor call sees)
                and the number of steps that produced tokens, and it is checked against
                the prompt and every token the processor recorded. Reading with
                ``sequences`` ends the run (the next call starts a new one). Optional when
                every step's token is known already (a hand-written loop with
                :meth:`record_tokens`).

        Returns:
            fp32 ``[B, new]`` on the scores' device, laid out like
            ``model.compute_transition_scores(sequences, scores, normalize_logits=True)``:
            column ``t`` holds ``log_softmax(scores_t / T)[token_t]``, exactly as the
            fused kernel computes it. Positions after a row's first EOS are NaN (when
            ``eos_token_id`` is known).
        """
        return self._token_logprobs(self._latest(), sequences)

    def _token_logprobs(self, run: _Run, sequences: torch.Tensor | None) -> torch.Tensor:
        run.check()
        if sequences is None:
            if run.n_picked < run.n_steps:
                raise RuntimeError(
                    "the token chosen at the last step is not known: pass out.sequences, or "
                    "call proc.record_tokens(tokens) after choosing each token"
                )
            return run.logprobs(self.eos_token_id, run.n_steps)
        n = check_sequences(run, sequences)
        seq = sequences.to(run.device)
        if run.n_picked < n:  # only the last step's token: no processor call saw it
            if run.buf is None:
                raise RuntimeError(
                    "the scores of this run's last step were released when the next run "
                    "started: call run.finish(out.sequences) before the next generate call"
                )
            run.picked.append(run.gather(seq[:, -1:]))
        run.n_final = n
        lp = run.logprobs(self.eos_token_id, n, seq[:, run.prompt_len:])
        if self._run is run:
            self._run = None  # read: the next call starts a new run
        self._close(run, release=False)
        return lp

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
        if kind not in SEQUENCE_CONFIDENCE_KINDS:  # before reading: reading may end the run
            raise ValueError(f"kind must be one of {SEQUENCE_CONFIDENCE_KINDS}, got {kind!r}")
        return pick_confidence(self.sequence_scores(sequences), kind)

    def step_records(self) -> dict[str, torch.Tensor]:
        """The latest run's per-step records, each ``[B, steps]`` on the scores' device:
        ``confidence``, ``entropy``, ``logsumexp`` (fp32), ``prediction`` (int64),
        ``alive`` (bool; False once a row has emitted EOS, when ``eos_token_id`` is known)."""
        return self._step_records(self._latest())

    def _step_records(self, run: _Run) -> dict[str, torch.Tensor]:
        run.check()
        records = {k: run.stacked(k) for k in ("confidence", "entropy", "logsumexp", "prediction")}
        records["alive"] = run.alive(self.eos_token_id, run.picked_tokens(), run.n_steps)
        return records

    def latest_stats(self) -> TokenStats:
        """The :class:`mllmcal.TokenStats` (``[B]`` fields) of the latest step."""
        return self._latest().stats[-1]

    def latest_scaled_scores(self) -> torch.Tensor:
        """``z = scores / T`` ``[B, V]`` fp32 of the latest step, valid until the next call:
        what a stopping criterion (which runs right after the token is chosen) can read to
        keep the row of a step it cares about. Read-only: a view of the processor's own
        buffer (row stride ``2 V``)."""
        run = self._latest()
        if run.buf is None:
            raise RuntimeError("the latest run has ended; its buffer was released")
        z = run.buf[:, 0]
        return z / run.temperature if run.raw else z

    def nbytes(self) -> int:
        """Bytes of device memory the records hold: O(B · steps) plus the one ``[B, 2, V]``
        buffer of the latest step; independent of the number of steps otherwise."""
        run = self._latest_run
        if run is None:
            return 0
        tensors = [run.first_ids, *run.picked, *([] if run.buf is None else [run.buf])]
        tensors += [t for s in run.stats for t in (s.logsumexp, s.prediction, s.flags)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    # ------------------------------------------------------------------ monitoring

    @property
    def state(self):
        """The :class:`mllmcal.CalibrationState` fed by :meth:`add_feedback`."""
        return self.monitor.state

    def add_feedback(
        self, key: Hashable | Sequence[Hashable], correct: bool | Sequence[bool] | torch.Tensor
    ) -> None:
        """Report whether generated answers were correct, possibly long after generation.

        Args:
            key: a request id given as ``proc.run(request_ids=[...])`` (or set through
                ``proc.request_ids``), or an ``int`` row of the latest run; or a list of them.
            correct: one bool per key.

        The row's sequence confidence and ``correct`` go into :attr:`state`. A request id
        is consumed by its feedback. Rows of a run need its last token: call
        ``run.finish(out.sequences)`` (or :meth:`finish`) first.
        """
        keys = list(key) if isinstance(key, (list, tuple)) else [key]
        corr = torch.as_tensor(correct).reshape(-1).bool()
        if corr.numel() != len(keys):
            raise ValueError(f"got {len(keys)} keys but {corr.numel()} correctness values")
        confs = []
        for k in keys:
            entry = self.monitor.get(k)
            if entry is not None:
                source, row = entry.source, entry.row
                conf = self._run_confidence(source) if isinstance(source, _Run) else source
                self.monitor.discard(k)
            elif isinstance(k, int) and not isinstance(k, bool):
                run = self._latest()
                if not -run.batch <= k < run.batch:
                    raise IndexError(f"row {k} is outside the latest batch of {run.batch}")
                conf, row = self._run_confidence(run), k
                if run.request_ids is not None:
                    self.monitor.discard(run.request_ids[k])
            else:
                raise KeyError(f"no generated row is waiting for feedback under id {k!r}")
            confs.append(conf[row : row + 1])
        self.monitor.score(torch.cat(confs), corr)

    def _run_confidence(self, run: _Run) -> torch.Tensor:
        n = run.n_final
        if n is None:
            if run.n_picked < run.n_steps:
                raise RuntimeError(
                    "the last generated tokens of this run are not known yet: call "
                    "run.finish(out.sequences) (or proc.finish(out.sequences)) first"
                )
            n = run.n_steps
        return pick_confidence(sequence_scores(run.logprobs(self.eos_token_id, n)),
                               self.sequence_confidence_kind)

    def token_summary(self) -> dict[str, Any]:
        """Token-level summary over every step seen so far, the open run included:
        ``tokens``, ``mean_confidence``, ``mean_entropy`` and ``confidence_histogram``
        (``n_bins`` counts). Reads device tensors (a host sync)."""
        run = self._open_run()
        return self.monitor.token_summary(run.totals(self.eos_token_id, self.n_bins) if run is not None else None)

    def _open_run(self) -> _Run | None:
        """The latest run while its totals are not folded into the monitor yet."""
        run = self._latest_run
        return run if run is not None and not run.closed and run.n_steps else None

    def snapshot(self) -> dict[str, Any]:
        """Plain-Python summary for logs and dashboards: temperature, runs and steps seen,
        the token summary, rows waiting for feedback, feedback received, and the
        calibration metrics of :attr:`state` (None before any feedback)."""
        run = self._open_run()
        return {
            "temperature": self.temperature,
            "n_bins": self.n_bins,
            "runs": self.monitor.n_runs + int(run is not None),
            "steps": self.monitor.n_steps + ((run.n_final or run.n_steps) if run else 0),
            **self.token_summary(),
            "pending_feedback": self.monitor.n_pending,
            "feedback": self.monitor.n_feedback,
            "calibration": self.monitor.calibration(),
        }
