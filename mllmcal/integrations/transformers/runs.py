"""Runs of :class:`~.processor.CalibratedLogitsProcessor`: what one ``generate`` call
records, and the explicit scope that says where a run begins and ends.

A logits processor sees ``(input_ids, scores)`` and nothing else: it cannot tell the next
step of a ``generate`` call from the first step of another call fed the previous
``out.sequences`` (both are the previous ``input_ids`` plus one token) or another prompt of
that length. So the run boundary is given, not guessed (:class:`GenerationRun`). Each
step's one gather records the chosen token's id next to its ``z`` (see :class:`_Run`), so
results are read only when every recorded token equals the generated column of
``sequences`` at that step and the prompt equals the first call's.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ... import _contract as C
from ...ops import TokenStats
from .._feedback import sequence_scores

if TYPE_CHECKING:
    from .processor import CalibratedLogitsProcessor

__all__ = ["GenerationRun", "MAX_VOCAB"]

# Token ids are kept as fp32 column indices (see _Run.buf): exact below 2**24.
MAX_VOCAB = 1 << 24

BEAM_SEARCH = (
    "this looks like beam search: rows are rebuilt between steps (transformers' beam "
    "search, like assisted decoding, passes views of a buffer it rebuilds every step), so "
    "a row's scores at one step and its token at the next belong to different beams. A "
    "logits processor cannot follow beams; use num_beams=1 (greedy or sampling, any "
    "num_return_sequences)"
)


def eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int] | None:
    """``eos_token_id`` (one id, several, or None) as a list of ints, or None."""
    if eos_token_id is None:
        return None
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@dataclass(eq=False)
class _Run:
    """Records of one run; every list entry is a small device tensor.

    ``buf`` is fp32 ``[B, 2, V]``: plane 0 holds the latest step's ``z = scores / T`` (or
    the raw scores, ``raw``), plane 1 the column indices ``0..V-1`` written once. The
    step's gather indexes both planes with the token id (an ``expand`` of one index
    column, a view), so the one gather per step returns ``(z[token], float(token))``:
    the token is recorded without another device op and checked when results are read.
    """

    batch: int
    vocab: int
    prompt_len: int
    temperature: float
    dtype: torch.dtype  # the scores' dtype (a later call must match it)
    first_ids: torch.Tensor  # input_ids of the first call (the prompt), by reference
    last_storage: int  # data_ptr of the latest call's input_ids storage (no reference)
    buf: torch.Tensor | None  # [B, 2, V] fp32, ours alone; None once released
    raw: bool  # plane 0 holds raw scores: gathered values are divided by T
    stats: list[TokenStats] = field(default_factory=list)  # views of one [7, B] per step
    picked: list[torch.Tensor] = field(default_factory=list)  # [B, 2, 1]: z and token id
    n_final: int | None = None  # steps that produced tokens, once known from sequences
    request_ids: list[Hashable] | None = None
    scope: GenerationRun | None = None
    closed: bool = False  # totals folded, waiting rows resolved or dropped
    error: str | None = None  # why this run's results are refused

    @property
    def n_steps(self) -> int:
        return len(self.stats)

    @property
    def n_picked(self) -> int:
        return len(self.picked)

    @property
    def resolved(self) -> bool:
        return self.n_final is not None or self.n_picked >= self.n_steps

    @property
    def device(self) -> torch.device:
        return self.first_ids.device if self.buf is None else self.buf.device

    def stacked(self, name: str, n: int | None = None) -> torch.Tensor:
        """``[B, n]`` of one statistic over the first ``n`` steps."""
        return torch.stack([getattr(s, name) for s in self.stats[:n]], dim=1)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """``[B, 2, 1]``: z and the token id of ``index`` ``[B, 1]`` in the latest step."""
        return self.buf.gather(2, index[:, None, :].expand(self.batch, 2, 1))

    def picked_tokens(self, n: int | None = None) -> torch.Tensor:
        """int64 ``[B, n]`` ids of the tokens chosen at the first ``n`` steps (as known)."""
        n = self.n_picked if n is None else min(n, self.n_picked)
        if n == 0:
            return torch.empty(self.batch, 0, dtype=torch.long, device=self.device)
        return torch.cat(self.picked[:n], dim=2)[:, 1].long()

    def check(self) -> None:
        if self.error is not None:
            raise ValueError(self.error)

    def alive(self, eos_ids: list[int] | None, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """``[B, n]`` bool: the row had not emitted EOS before step t (``tokens`` holds at
        least the first ``n - 1`` generated tokens)."""
        alive = torch.ones(self.batch, n, dtype=torch.bool, device=tokens.device)
        if not eos_ids or n <= 1:
            return alive
        eos = torch.tensor(eos_ids, dtype=torch.long, device=tokens.device)
        is_eos = torch.isin(tokens[:, : n - 1], eos)
        alive[:, 1:] = torch.cumsum(is_eos.long(), dim=1) == 0
        return alive

    def logprobs(self, eos_ids: list[int] | None, n: int,
                 tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, n]`` fp32 log p of the chosen tokens, NaN after a row's first EOS."""
        if n == 0:
            return torch.empty(self.batch, 0, device=self.device)
        z = torch.cat(self.picked[:n], dim=2)[:, 0]  # z of the chosen tokens
        lp = (z / self.temperature if self.raw else z) - self.stacked("logsumexp", n)
        alive = self.alive(eos_ids, self.picked_tokens(n) if tokens is None else tokens, n)
        return torch.where(alive, lp, torch.full_like(lp, float("nan")))

    def totals(self, eos_ids: list[int] | None, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[count, Σ conf, Σ entropy]`` (fp64) and the int64 ``[n_bins]`` confidence
        histogram of the run's live, valid token rows."""
        n = self.n_final if self.n_final is not None else self.n_steps
        conf, ent = self.stacked("confidence", n), self.stacked("entropy", n)
        keep = self.alive(eos_ids, self.picked_tokens(n), n) & ~torch.isnan(conf)
        c = torch.where(keep, conf, torch.zeros_like(conf)).double()
        e = torch.where(keep, ent, torch.zeros_like(ent)).double()
        totals = torch.stack([keep.double().sum(), c.sum(), e.sum()])
        bins = C.conf_bins(conf.nan_to_num(0.0), n_bins)
        hist = torch.zeros(n_bins, dtype=torch.long, device=conf.device)
        hist.index_add_(0, bins.reshape(-1), keep.reshape(-1).long())
        return totals, hist


def check_sequences(run: _Run, sequences: torch.Tensor) -> int:
    """Check ``sequences`` ``[B, L]`` against what ``run`` saw; return the number of steps
    that produced tokens (``L - prompt``). A host sync (reads happen after ``generate``)."""
    if sequences.dim() != 2:
        raise ValueError(f"sequences must be [B, L], got shape {tuple(sequences.shape)}")
    if sequences.shape[0] != run.batch:
        beams = run.batch // max(sequences.shape[0], 1)
        if sequences.shape[0] and run.batch % sequences.shape[0] == 0 and beams > 1:
            raise ValueError(
                f"sequences have {sequences.shape[0]} rows but every step had {run.batch}: "
                f"{BEAM_SEARCH} (num_beams={beams}?)"
            )
        raise ValueError(f"sequences must be [{run.batch}, L], got shape {tuple(sequences.shape)}")
    n = sequences.shape[1] - run.prompt_len
    if not 1 <= n <= run.n_steps:
        raise ValueError(
            f"sequences have {sequences.shape[1]} positions but the latest run had a "
            f"{run.prompt_len}-token prompt and {run.n_steps} steps; pass the output "
            "of the generate call this processor took part in"
        )
    seq = sequences.to(run.device)
    hint = (
        "; if a generate call was fed another prompt of the length of the previous call's "
        "next step, it was recorded as that call's continuation: open `with proc.run():` "
        "around each generate call (or call proc.reset() between them)"
    )
    if not torch.equal(seq[:, : run.prompt_len], run.first_ids):
        raise ValueError("the prompt of these sequences is not the one this run began with" + hint)
    tokens = run.picked_tokens(n)
    if not torch.equal(tokens, seq[:, run.prompt_len : run.prompt_len + tokens.shape[1]]):
        raise ValueError(
            "sequences do not match the tokens generated in the latest run (the token "
            "recorded at some step is not the one in sequences)" + hint
        )
    return n


class GenerationRun:
    """One run of a :class:`~.processor.CalibratedLogitsProcessor`: the scope of one
    ``generate`` call (or one hand-written decode loop), and its results.

    Made by :meth:`CalibratedLogitsProcessor.run`; use it as a context manager::

        with proc.run(request_ids=["q1", "q2"]) as run:
            out = model.generate(**inputs, logits_processor=[proc])
        logp = run.finish(out.sequences)     # [B, new_tokens]; "q1", "q2" await feedback

    Every processor call inside the ``with`` block belongs to this run, whatever the
    shapes; the first call starts it afresh. A call that is not the next step of the
    run (another prompt, another batch) raises: one ``generate`` call per scope (a second
    one fed exactly ``out.sequences`` is the next step, and is read as one run with the
    first, exactly; one fed another prompt of that length is refused when read). After
    the block the results are read here, exactly as through the processor's methods of
    the same names; :meth:`finish` also releases the run's ``[B, 2, V]`` buffer and gives
    the request ids their sequence confidence. Finish a run before the next one starts:
    the next run releases the buffer that the last step's token needs.
    """

    def __init__(self, processor: CalibratedLogitsProcessor,
                 request_ids: Sequence[Hashable] | None = None) -> None:
        self.processor = processor
        self.request_ids = None if request_ids is None else list(request_ids)
        self._record: _Run | None = None
        self._entered = False

    def __enter__(self) -> GenerationRun:
        if self._entered:
            raise RuntimeError("a run scope can be entered once; open a new proc.run()")
        self._entered = True
        self.processor._open_scope(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.processor._close_scope(self)

    @property
    def record(self) -> _Run:
        if self._record is None or self._record.n_steps == 0:
            raise RuntimeError("no decode step was recorded in this run scope; call "
                               "model.generate(..., logits_processor=[proc]) inside it")
        return self._record

    @property
    def n_steps(self) -> int:
        """Processor calls recorded in this run."""
        return 0 if self._record is None else self._record.n_steps

    def token_logprobs(self, sequences: torch.Tensor | None = None) -> torch.Tensor:
        """See :meth:`CalibratedLogitsProcessor.token_logprobs`."""
        return self.processor._token_logprobs(self.record, sequences)

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """See :meth:`CalibratedLogitsProcessor.finish`."""
        return self.processor._token_logprobs(self.record, sequences)

    def sequence_scores(self, sequences: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :meth:`CalibratedLogitsProcessor.sequence_scores`."""
        return sequence_scores(self.token_logprobs(sequences))

    def step_records(self) -> dict[str, torch.Tensor]:
        """See :meth:`CalibratedLogitsProcessor.step_records`."""
        return self.processor._step_records(self.record)
