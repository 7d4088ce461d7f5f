"""One engine step's ``[B]`` statistics and what the processors keep with them (shared by
the vLLM runners and the SGLang integration)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ...ops import TokenStats, token_stats

__all__ = [
    "CONF", "ENT", "LSE", "PRED", "STEP_FIELDS", "ChosenLogit", "SavedLogits", "StepStats",
    "nan_to_none", "token_logprob",
]

# Rows of a StepStats host array: the token_stats fields every step has.
CONF, ENT, LSE, PRED = range(4)
STEP_FIELDS = ("confidence", "entropy", "logsumexp", "prediction")


@dataclass(frozen=True)
class SavedLogits:
    """Copies of a step's opted-in logits rows, kept until their chosen tokens are known.

    Attributes:
        logits: ``[b, V]`` copy of the rows (in the logits' dtype and device).
        index: int64 ``[b]`` on the logits' device: the batch row of each copied row.
        position: batch row -> its index in ``logits``, where the host knows which rows
            were copied (V1); empty where only the device does (V2 with several rows per
            request).
    """

    logits: torch.Tensor
    index: torch.Tensor
    position: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def take(cls, logits: torch.Tensor, rows: list[int],
             position: Mapping[int, int] | None = None) -> SavedLogits:
        """Copy ``rows`` of the ``[B, V]`` ``logits`` (the engine changes them in place
        after the processor returns). The index is copied to the device without blocking
        (``torch.tensor(..., device="cuda")`` would be a synchronous copy)."""
        idx = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        return cls(logits.index_select(0, idx), idx, {} if position is None else position)


@dataclass(frozen=True)
class ChosenLogit:
    """Where the chosen token's logit of one row was read to: entry ``index`` of the
    one-row statistics ``values`` (a :class:`StepStats` of the gathered logits)."""

    values: StepStats
    index: int


class StepStats:
    """The ``[B]`` statistics of one step, read back to the host without blocking.

    Built from the step's rows, or from its :class:`~mllmcal.TokenStats` (rows
    :data:`STEP_FIELDS`, read when first needed). On a CUDA device the rows are stacked and
    copied into pinned memory with ``non_blocking=True`` and an event is recorded;
    :meth:`ready` polls the event, so the reader never waits. On the CPU the rows are read
    as they are, by whoever first asks for a value (the drain thread, as a rule), so the
    engine's step pays no tensor op for them.

    Attributes:
        temperature: the calibration temperature the statistics were computed at.
        saved: the step's opted-in rows until their chosen logits are read (else None).
        chosen: batch row -> where its chosen token's logit was read to.
    """

    __slots__ = ("_rows", "_host", "_event", "_lists", "temperature", "saved", "chosen")

    def __init__(self, rows: Iterable[torch.Tensor] | TokenStats, *, temperature: float = 1.0,
                 defer: bool = False) -> None:
        self._rows: tuple[torch.Tensor, ...] | TokenStats | None = (
            rows if isinstance(rows, TokenStats) else tuple(rows))
        self._host: torch.Tensor | tuple[torch.Tensor, ...] | None = None
        self._event = None
        self._lists: list[list[float]] | None = None
        self.temperature = temperature
        self.saved: SavedLogits | None = None
        self.chosen: dict[int, ChosenLogit] = {}
        if not defer:
            self.launch_copy()

    @classmethod
    def observe(cls, logits: torch.Tensor, temperature: float) -> StepStats:
        """:func:`~mllmcal.token_stats` of a step's ``[B, V]`` logits, the host copy not
        launched: the caller keeps its rows first, then :meth:`launch_copy`, so a ready
        step has its kept rows in place."""
        return cls(token_stats(logits, temperature=temperature), temperature=temperature,
                   defer=True)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        rows = self._rows
        if isinstance(rows, TokenStats):
            rows = self._rows = tuple(getattr(rows, name) for name in STEP_FIELDS)
        return rows

    def append_rows(self, rows: Iterable[torch.Tensor]) -> None:
        """Add rows before :meth:`launch_copy` (values computed a step later, on device)."""
        self._rows = self._tensors() + tuple(rows)

    def launch_copy(self) -> None:
        rows = self._rows
        # A result of the "cpu" backend is on the CPU: no field is made to ask its device.
        on_cpu = isinstance(rows, TokenStats) and rows.backend == "cpu"
        if not on_cpu and self._tensors()[0].device.type == "cuda":
            stacked = torch.stack([r.to(torch.float32) for r in self._tensors()])
            self._host = torch.empty(stacked.shape, dtype=torch.float32, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = ()  # marks the copy "launched": the rows themselves are read

    def ready(self) -> bool:
        if self._lists is not None:
            return True
        return self._host is not None and (self._event is None or self._event.query())

    def wait(self) -> None:
        """Block until the host copy is complete (shutdown only)."""
        if self._event is not None and self._lists is None:
            self._event.synchronize()

    def value(self, i: int, r: int) -> float:
        """One host value, ``values()[i][r]``, without converting the rest (call when
        :meth:`ready`; safe against :meth:`values` running in another thread)."""
        lists, host, rows = self._lists, self._host, self._rows
        if lists is not None:
            return lists[i][r]
        if host is None or rows is None:  # values() finished between the reads
            return self._lists[i][r]
        if isinstance(host, torch.Tensor):
            return float(host[i, r])
        if isinstance(rows, TokenStats):
            return float(getattr(rows, STEP_FIELDS[i])[r])
        return float(rows[i][r])

    def values(self) -> list[list[float]]:
        """Host values as ``[n_rows_of_stats][B]`` Python numbers (call when :meth:`ready`;
        rows of integers, as the prediction, give ints on the CPU)."""
        if self._lists is None:
            host = self._host
            if isinstance(host, torch.Tensor):
                self._lists = host.tolist()
            else:
                self._lists = [r.tolist() for r in self._tensors()]
            self._rows = self._host = None
        return self._lists


def nan_to_none(x: float | None) -> float | None:
    """A record's value: NaN (a row without a defined value) becomes None (JSON null)."""
    return None if (x is None or math.isnan(x)) else x


def token_logprob(token: int, pred: int, conf: float, lse: float, logit: float | None,
                  temperature: float) -> float | None:
    """The log-probability of ``token`` (negative: not known) under a row with argmax
    ``pred``, confidence ``conf`` and logsumexp ``lse`` of ``logits / temperature``:
    ``log(conf)`` for the argmax, ``logit / temperature - lse`` for another token whose
    ``logit`` was kept (None or NaN: not kept), else None (not known exactly)."""
    if token >= 0 and token == pred:
        return math.log(conf) if conf > 0 else None
    if logit is not None and not math.isnan(logit):
        return logit / temperature - lse
    return None
