"""A fixed-size, exactly mergeable calibration state that cannot overflow.

Every prediction lands in one of ``n_bins`` equal-width confidence bins on [0, 1]
(``bin = min(floor(conf * n_bins), n_bins - 1)``, product in fp32, as in docs/design.md). Per bin
the state keeps three exact integer sums: the count, Σ confidence in units of 2**-32 and
Σ correct. Besides the histogram it keeps four integer totals for the rows scored through
:meth:`CalibrationState.update_logits` (the number of rows whose NLL was summed, the number of
rows scored, Σ NLL in units of 2**-24 and Σ Brier in units of 2**-30). Each row's NLL and
Brier value is rounded to its fixed-point integer as floor(x·scale + 0.5) in fp32 (exact
products: the scales are powers of two) after clamping fp32 round-off below 0 to 0.

Why integers: a float sum depends on the order of its terms, so two processes that saw the
same tokens in a different split would disagree in the last bits. Each row's value is rounded
to its fixed-point integer once, deterministically, and integer addition is associative, so
any split of the same rows, merged in any order, gives bit-identical state.

Two limbs, so that nothing wraps. Every sum ``v`` is held as two int64 numbers,
``v = hi · 2**32 + lo``:

* ``lo`` (the tensors ``hist`` and ``totals``) is the working limb the fused kernels add
  into; below 2**30 rows it holds the whole value. Every row adds at most 2**32 to any
  ``lo`` entry (a confidence of 1.0 is 2**32 units; a row's NLL is split into its high and
  low 32 bits before summing), so a ``lo`` that starts
  below 2**32 holds at least 2**30 more rows before it could reach 2**63. The state counts, on
  the host and without reading the device, an upper bound on the rows added since the last
  carry, and carries (``hi += lo >> 32; lo &= 2**32 - 1``, a few device ops, no host sync:
  :func:`mllmcal.calibration.functional.carry_`) before that bound reaches 2**30 (and before
  every all_reduce).
* ``hi`` (``hist_hi``, ``totals_hi``) takes the carries with a saturating add: it never
  exceeds ``HI_LIMIT + 1`` = 2**62 + 1, and a value above ``HI_LIMIT`` is a sticky mark that
  the state has overflowed. Every read (metrics, :meth:`~CalibrationState.to_dict`,
  :meth:`~CalibrationState.merge`, :meth:`~CalibrationState.all_reduce`) raises
  ``OverflowError`` on a marked state, naming the sum; nothing ever wraps.

Limits (a sum may reach (2**62 + 1) · 2**32 − 1 ≈ 2**94 units):

=================  ============================================================
count, Σ correct   2**94 rows
Σ confidence       2**62 rows at confidence 1.0 (more at lower confidences)
Σ Brier            2**63 rows at the maximum Brier score 2
Σ NLL              2**70 nats in total (e.g. 2**62 rows at a mean NLL of 256 nats);
                   a single row's NLL above 2**31 nats counts as infinite, as before
one update         at most 2**30 rows per call (split larger batches)
=================  ============================================================

Memory is ``2 · (3 · n_bins + 4)`` int64 numbers however many rows are added. The maths
(binning, ECE, the limb carry) lives in :mod:`mllmcal.calibration.functional`; the
all_reduce handshake and the dict checks in :mod:`mllmcal.calibration._sync`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import _contract as C
from ..linear import linear_token_stats
from ..ops import TokenStats, histogram_add_, token_stats
from . import _sync
from .functional import (
    BRIER_FIXED_POINT_SCALE,
    HI_LIMIT,
    LIMB_BITS,
    LIMB_MASK,
    NLL_FIXED_POINT_SCALE,
    NLL_OVERFLOW_NATS,
    carry_,
    check_n_bins,
    check_norm,
    check_pairs,
    ece_from_bins,
    saturating_add,
)

# check_pairs and the fixed-point constants are defined in .functional; importing them from
# here keeps working.
__all__ = [
    "CalibrationState", "NLL_FIXED_POINT_SCALE", "BRIER_FIXED_POINT_SCALE", "HI_LIMIT",
    "MAX_ROWS_PER_UPDATE", "check_pairs",
]

# Rows one update may add, and the bound on rows between carries: each row adds < 2**32 + 1
# to a lo entry (< 2**32 after a carry), so lo < 2**32 · (2**30 + 2**30 + 1) < 2**63.
MAX_ROWS_PER_UPDATE = 1 << 30
_CARRY_AT = 1 << 30
# totals layout: rows whose NLL was summed, rows scored, Σ NLL, Σ Brier (fixed point).
_N_NLL_FINITE, _N_SCORED, _SUM_NLL, _SUM_BRIER = range(4)
# Layout descriptor exchanged by all_reduce before the data (bump on any layout change).
_LAYOUT_VERSION = 2


class CalibrationState:
    """Streaming calibration histogram with O(n_bins) memory, exact merges and no overflow.

    Args:
        n_bins: number of equal-width confidence bins on [0, 1] (>= 1).
        device: where the int64 state tensors live. ``None`` means "the device of the first
            data it sees" (CPU until then); updates with data on another device are an error.

    The tensors are the low limbs ``hist`` (int64 ``[3, n_bins]``: count, Σ confidence · 2**32,
    Σ correct; the layout ``token_stats(histogram=...)`` adds into) and ``totals`` (int64
    ``[4]``), and the high limbs ``hist_hi`` and ``totals_hi`` of the same shapes; each sum is
    ``hi · 2**32 + lo`` (see the module docstring for the carry rule and the limits). Nothing in
    :meth:`update` / :meth:`update_logits` synchronises with the host, so they can sit in a
    decode loop; the metric methods (:meth:`ece`, :meth:`accuracy`, ...) read the exact sums
    back as Python ints and return floats.

    Example:
        >>> import torch, mllmcal
        >>> s = mllmcal.CalibrationState(n_bins=10)
        >>> s.update(torch.tensor([0.95, 0.55, 0.8]), torch.tensor([True, False, True]))
        >>> s.count, round(s.accuracy(), 4)
        (3, 0.6667)
    """

    def __init__(self, n_bins: int = 15, device: torch.device | str | None = None) -> None:
        self.n_bins = check_n_bins(n_bins)
        self._device_fixed = device is not None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.hist = torch.zeros(3, self.n_bins, dtype=torch.int64, device=dev)
        self.totals = torch.zeros(4, dtype=torch.int64, device=dev)
        self.hist_hi = torch.zeros_like(self.hist)
        self.totals_hi = torch.zeros_like(self.totals)
        # Upper bound, in rows of at most 2**32 units each, on what the lo limbs hold.
        self._lo_rows = 0
        self._consts_t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _consts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Built once per device (reset by _adopt): creating them in the decode loop would be
        # host-to-device copies.
        if self._consts_t is None:
            self._consts_t = (
                torch.tensor([[-NLL_FIXED_POINT_SCALE], [BRIER_FIXED_POINT_SCALE]],
                             dtype=torch.float32, device=self.device),
                torch.tensor([[-NLL_OVERFLOW_NATS], [-math.inf]], dtype=torch.float32,
                             device=self.device),
                torch.tensor(0.5, dtype=torch.float32, device=self.device),
            )
        return self._consts_t

    # ------------------------------------------------------------------ bookkeeping

    @property
    def device(self) -> torch.device:
        return self.hist.device

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.hist, self.totals, self.hist_hi, self.totals_hi

    def _adopt(self, device: torch.device) -> None:
        """Move an unpinned state to ``device`` on first use, or reject a device mismatch."""
        if device == self.device:
            self._device_fixed = True
            return
        if not self._device_fixed:
            self.hist, self.totals, self.hist_hi, self.totals_hi = (
                t.to(device) for t in self._tensors()
            )
            self._consts_t = None
            self._device_fixed = True
            return
        raise ValueError(
            f"this CalibrationState lives on {self.device} but the data is on {device}; "
            f"create it with device={str(device)!r} or move the data"
        )

    def reset(self) -> CalibrationState:
        """Forget all data (keeps ``n_bins`` and the device)."""
        for t in self._tensors():
            t.zero_()
        self._lo_rows = 0
        return self

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant: ``16 * (3 * n_bins + 4)``)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _carry(self) -> None:
        """Move the lo limbs' bits above 2**32 into the hi limbs (device ops, no host sync)."""
        carry_(self.hist, self.hist_hi)
        carry_(self.totals, self.totals_hi)
        self._lo_rows = 1  # lo < 2**32: at most "one row's worth"

    def _reserve(self, rows: int) -> None:
        """Make room in the lo limbs for ``rows`` more rows (carrying first if needed)."""
        if rows > MAX_ROWS_PER_UPDATE:
            raise ValueError(
                f"one update may add at most 2**30 rows, got {rows}; split the batch"
            )
        if self._lo_rows + rows > _CARRY_AT:
            self._carry()
        self._lo_rows += rows

    # ------------------------------------------------------------------ updates

    def update(
        self, confidence: torch.Tensor, correct: torch.Tensor, *, validate: bool = True
    ) -> None:
        """Add (confidence, correct) pairs from any source.

        Args:
            confidence: float tensor of any shape, values in [0, 1]. It is rounded to fp32
                first, as the fused kernels produce it, so both paths bin identically.
            correct: bool (or 0/1) tensor of the same shape, same device.
            validate: check value ranges (a host sync on GPU); pass False in hot loops.

        Raises:
            ValueError: the shapes differ (a ``[2, 3]`` confidence with a ``[3, 2]``
                correctness has as many elements, but flattening would pair them wrongly).
        """
        if isinstance(confidence, torch.Tensor) and isinstance(correct, torch.Tensor) \
                and confidence.shape != correct.shape \
                and confidence.numel() == correct.numel():  # other counts: check_pairs says so
            raise ValueError(f"confidence and correct must have the same shape, got "
                             f"{tuple(confidence.shape)} and {tuple(correct.shape)}")
        c, y = check_pairs(confidence, correct, validate=validate)
        self._adopt(c.device)
        self._reserve(c.numel())
        histogram_add_(self.hist, c.float(), y, torch.ones_like(y))

    def update_logits(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: float | torch.Tensor = 1.0,
        *,
        backend: str = "auto",
        ignore_index: int = C.IGNORE_INDEX,
        validate: bool = True,
    ) -> TokenStats:
        """Score ``[..., V]`` logits against labels in one fused pass and add them.

        The histogram is filled inside :func:`mllmcal.token_stats`; the NLL and Brier sums are
        then added from its ``[N]`` outputs. Rows that are invalid (NaN, +inf, fully masked)
        or whose label is ``ignore_index`` are left out of everything.

        Args:
            logits: ``[..., V]`` fp32/fp16/bf16/fp64 tensor on the state's device.
            labels: integer tensor shaped like ``logits.shape[:-1]``.
            temperature: float > 0 or a per-row tensor; the statistics are of ``logits / T``.
            backend, ignore_index, validate: passed to :func:`mllmcal.token_stats`.

        Returns:
            the :class:`mllmcal.TokenStats` of the pass (fp32 ``[...]`` fields).
        """
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if labels is None:
            raise ValueError("update_logits needs labels (to know which predictions are correct)")
        self._adopt(logits.device)
        self._reserve(logits.numel() // max(1, logits.shape[-1]) if logits.dim() else 1)
        stats = token_stats(
            logits, labels, temperature, backend, ignore_index=ignore_index,
            histogram=self.hist, validate=validate,
        )
        self._add_scores(stats.label_logprob.reshape(-1), stats.brier.reshape(-1))
        return stats

    def update_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      temperature: float | torch.Tensor = 1.0, *, bias: torch.Tensor | None = None,
                      backend: str = "auto", ignore_index: int = C.IGNORE_INDEX) -> TokenStats:
        """:meth:`update_logits` of ``hidden @ weight.T + bias`` without the ``[N, V]`` logits,
        through :func:`mllmcal.linear_token_stats` (``hidden`` ``[..., H]``, ``weight``
        ``[V, H]``, ``bias`` ``[V]``, ``labels`` ``[...]``; the tiles' logits are fp32)."""
        self._adopt(hidden.device)
        self._reserve(hidden.numel() // max(1, hidden.shape[-1]) if hidden.dim() else 1)
        stats = linear_token_stats(hidden, weight, labels, temperature=temperature, bias=bias,
                                   histogram=self.hist, ignore_index=ignore_index, backend=backend)
        self._add_scores(stats.label_logprob.reshape(-1), stats.brier.reshape(-1))
        return stats

    def _add_scores(self, label_logprob: torch.Tensor, brier: torch.Tensor) -> None:
        # Both rows go through one [2, N] fp32 pipeline with few elementwise launches: for
        # the small N of a decode step, launch overhead, not arithmetic, is the cost.
        # Row 0: log p_y, summed as NLL = -log p_y when > -2**31 (False for NaN and -inf);
        # row 1: Brier, NaN exactly on the rows the histogram skipped (invalid or ignored).
        scales, limits, half = self._consts()
        vals = torch.stack((label_logprob, brier))
        ok = vals > limits
        # The scales are powers of two (row 0 negated), so x·scale is exact in fp32. NLL and
        # Brier are >= 0 in exact arithmetic; clamping fp32 round-off at 0 lets the
        # truncating cast implement floor(x·scale + 0.5), a fixed, order-free rounding.
        fixed = (
            torch.addcmul(half, torch.where(ok, vals, 0.0), scales)
            .clamp_min_(0.5)
            .long()
        )
        # A row's fixed NLL reaches 2**55: its high bits go straight to the hi limb, so each
        # row adds < 2**32 to lo (the bound _reserve counts on).
        self.totals += torch.cat((ok.sum(1), (fixed & LIMB_MASK).sum(1)))
        self.totals_hi[2:] = saturating_add(self.totals_hi[2:], (fixed >> LIMB_BITS).sum(1))

    # ------------------------------------------------------------------ exact read-back

    def _check_not_saturated(self) -> None:
        """Raise OverflowError (naming the sum) if a hi limb passed its limit. Syncs."""
        over_h = (self.hist_hi > HI_LIMIT).any(1).cpu().tolist()
        over_t = (self.totals_hi > HI_LIMIT).cpu().tolist()
        names = [k for k, o in zip(_sync.STATE_HIST_KEYS, over_h, strict=True) if o]
        names += [k for k, o in zip(("n_nll_finite", "n_scored", "sum_nll_fixed",
                                     "sum_brier_fixed"), over_t, strict=True) if o]
        if names:
            raise OverflowError(
                f"CalibrationState overflowed: {', '.join(names)} passed its limit of "
                f"~2**94 fixed-point units (see mllmcal.calibration.state for the limits)"
            )

    def _exact(self) -> tuple[list[list[int]], list[int]]:
        """Exact sums as Python ints: ``([3][n_bins] histogram, [4] totals)``."""
        self._check_not_saturated()
        lo_h, hi_h = self.hist.cpu().tolist(), self.hist_hi.cpu().tolist()
        lo_t, hi_t = self.totals.cpu().tolist(), self.totals_hi.cpu().tolist()
        h = [[(a << LIMB_BITS) + b for a, b in zip(hr, lr, strict=True)]
             for hr, lr in zip(hi_h, lo_h, strict=True)]
        t = [(a << LIMB_BITS) + b for a, b in zip(hi_t, lo_t, strict=True)]
        return h, t

    def _load_exact(self, h: list[list[int]], t: list[int]) -> None:
        """Set the state to the exact sums ``h`` ([3][n_bins]) and ``t`` ([4]), ints within
        ``functional.MAX_VALUE``."""
        flat = [x for row in h for x in row] + list(t)
        self._store(torch.tensor([x & LIMB_MASK for x in flat], dtype=torch.int64),
                    torch.tensor([x >> LIMB_BITS for x in flat], dtype=torch.int64))
        self._lo_rows = 1

    def _store(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Copy flat ``[3 · n_bins + 4]`` limbs (histogram, then totals) into the state."""
        nh = self.hist.numel()
        self.hist.copy_(lo[:nh].reshape(self.hist.shape))
        self.totals.copy_(lo[nh:])
        self.hist_hi.copy_(hi[:nh].reshape(self.hist.shape))
        self.totals_hi.copy_(hi[nh:])

    # ------------------------------------------------------------------ merging

    def _check_compatible(self, other: CalibrationState) -> None:
        if not isinstance(other, CalibrationState):
            raise TypeError(f"can only merge a CalibrationState, got {type(other).__name__}")
        if other.n_bins != self.n_bins:
            raise ValueError(
                f"cannot merge states with different n_bins ({self.n_bins} and {other.n_bins})"
            )
        if other.device != self.device:
            if not self._device_fixed and self.count == 0:
                self._adopt(other.device)
                return
            raise ValueError(
                f"cannot merge states on different devices ({self.device} and {other.device}); "
                "move one with CalibrationState.from_dict(s.to_dict(), device=...)"
            )

    def merge(self, other: CalibrationState) -> CalibrationState:
        """Add ``other``'s data to this state, exactly; the result does not depend on order.

        Raises ``OverflowError`` (leaving this state unchanged) if a sum would pass the
        state's limits. Reads a few numbers back to check that (a host sync).
        """
        self._check_compatible(other)
        # Carry only when the two lo limbs together could pass 2**63: below that, small
        # states keep their whole value in ``hist``/``totals`` (what callers of
        # token_stats(histogram=state.hist) see).
        if self._lo_rows + other._lo_rows > _CARRY_AT:
            other._carry()
            self._carry()
        new_hi = [saturating_add(a, b) for a, b in ((self.hist_hi, other.hist_hi),
                                                (self.totals_hi, other.totals_hi))]
        if bool(torch.stack([(h > HI_LIMIT).any() for h in new_hi]).any()):
            raise OverflowError(
                "merging these CalibrationStates would pass the state's limit of ~2**94 "
                "fixed-point units in a sum (see mllmcal.calibration.state for the limits)"
            )
        self.hist_hi.copy_(new_hi[0])
        self.totals_hi.copy_(new_hi[1])
        self.hist += other.hist
        self.totals += other.totals
        self._lo_rows += other._lo_rows
        return self

    def __add__(self, other: CalibrationState) -> CalibrationState:
        return self.copy().merge(other)

    def copy(self) -> CalibrationState:
        out = CalibrationState(self.n_bins, self.device)
        out._device_fixed = self._device_fixed
        for dst, src in zip(out._tensors(), self._tensors(), strict=True):
            dst.copy_(src)
        out._lo_rows = self._lo_rows
        return out

    @classmethod
    def from_histogram(
        cls, hist: torch.Tensor, hist_hi: torch.Tensor | None = None
    ) -> CalibrationState:
        """A state holding a histogram kept elsewhere in this state's two-limb layout.

        ``hist`` (int64 ``[3, n_bins]``: count, Σ confidence · 2**32, Σ correct, the layout
        ``token_stats(histogram=...)`` fills) is the low limb, ``hist_hi`` (same shape,
        default zeros) the high limb, possibly sums of several such pairs (the result of a
        distributed sum). Both are copied onto their device and normalised with
        :func:`~mllmcal.calibration.functional.carry_`; a negative ``hist_hi`` entry (a sum
        of limbs that wrapped past 2**63) marks the state overflowed, so reading it raises
        ``OverflowError``. The NLL and Brier totals are zero.
        """
        if hist.dtype != torch.int64 or hist.dim() != 2 or hist.shape[0] != 3:
            raise ValueError(f"hist must be int64 [3, n_bins], got {hist.dtype} "
                             f"{tuple(hist.shape)}")
        s = cls(hist.shape[1], device=hist.device)
        s.hist.copy_(hist)
        if hist_hi is not None:
            s.hist_hi.copy_(torch.where(hist_hi < 0, HI_LIMIT + 1, hist_hi))
        s._carry()
        return s

    def all_reduce(self, group: Any = None) -> CalibrationState:
        """Sum this state over all ranks of a ``torch.distributed`` process group, in place.

        Two collectives. First every rank contributes its layout (``n_bins``, layout version,
        overflow mark) to a fixed-size max-reduce, so ranks whose states differ all learn it
        and all raise ``ValueError`` (``OverflowError`` if any rank's state overflowed) instead
        of hanging in a reduce of tensors of different sizes. Then one sum of a packed int64
        tensor of ``3 · (3 · n_bins + 4)`` numbers: ``lo`` and the ``hi`` limb split into two
        31-bit halves, so the sum over up to 2**31 ranks cannot wrap. The state's device must
        suit the backend (CPU for gloo, CUDA for NCCL). Integer sums make the result identical
        to a single pass.
        """
        _sync.require_process_group()
        self._carry()
        saturated = int(bool((self.hist_hi > HI_LIMIT).any() | (self.totals_hi > HI_LIMIT).any()))

        def check(low: list[float], high: list[float]) -> None:
            (lo_bins, lo_ver, _), (hi_bins, hi_ver, any_sat) = (map(int, low), map(int, high))
            if hi_bins != lo_bins or hi_ver != lo_ver:
                raise ValueError(
                    "CalibrationState.all_reduce: the ranks' states have different layouts "
                    f"(n_bins from {lo_bins} to {hi_bins}, layout version from {lo_ver} "
                    f"to {hi_ver}; this rank has n_bins={self.n_bins}); every rank must use "
                    "the same n_bins and mllmcal version"
                )
            if any_sat:
                raise OverflowError("CalibrationState.all_reduce: a rank's state has overflowed")

        lo = torch.cat((self.hist.reshape(-1), self.totals))
        hi = torch.cat((self.hist_hi.reshape(-1), self.totals_hi))
        packed = torch.cat((lo, hi >> 31, hi & ((1 << 31) - 1)))
        _sync.agree_then_sum((self.n_bins, _LAYOUT_VERSION, saturated), [packed], check,
                             device=self.device, group=group)
        k = lo.numel()
        lo, hh, hl = packed[:k], packed[k:2 * k], packed[2 * k:]
        # hh ≤ 2**31 keeps hh·2**31 ≤ HI_LIMIT; anything above is past the limit.
        over = hh > (HI_LIMIT >> 31)
        hi = torch.where(over, HI_LIMIT + 1,
                         saturating_add(hh.clamp(max=HI_LIMIT >> 31) << 31, hl))
        self._store(lo, hi)
        self._carry()
        self._check_not_saturated()
        return self

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-serialisable) copy of the state with exact integer sums (Python
        ints, possibly above 2**63); equal data gives equal dicts."""
        h, t = self._exact()
        return {
            "format": _sync.STATE_FORMAT,
            "n_bins": self.n_bins,
            "count": h[C.HIST_COUNT],
            "sum_confidence_fixed": h[C.HIST_SUM_CONF],
            "sum_correct": h[C.HIST_SUM_CORRECT],
            "n_scored": t[_N_SCORED],
            "sum_nll_fixed": t[_SUM_NLL],
            "sum_brier_fixed": t[_SUM_BRIER],
            "n_nll_overflow": t[_N_SCORED] - t[_N_NLL_FINITE],
        }

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], device: torch.device | str | None = None
    ) -> CalibrationState:
        """Rebuild a state from :meth:`to_dict` output (optionally on another device).

        The dict is validated first; a ``ValueError`` (``TypeError`` for a non-mapping) lists
        every problem found: unknown format, missing or unexpected keys, values that are not
        integers (bools and floats such as ``3.0`` are rejected), lists whose length is not
        ``n_bins``, negative numbers, and broken invariants (``sum_correct <= count`` and
        ``sum_confidence_fixed`` within the bin's confidence range times ``count`` per bin,
        ``n_nll_overflow <= n_scored <= total count``, NLL and Brier sums within their
        per-row bounds, values within the state's limits).
        """
        problems = _sync.state_dict_problems(d)
        if problems:
            raise ValueError("invalid CalibrationState dict: " + "; ".join(problems))
        s = cls(d["n_bins"], device)
        h = [list(d[k]) for k in _sync.STATE_HIST_KEYS]
        t = [d["n_scored"] - d["n_nll_overflow"], d["n_scored"], d["sum_nll_fixed"],
             d["sum_brier_fixed"]]
        s._load_exact(h, t)
        return s

    # ------------------------------------------------------------------ metrics

    @property
    def count(self) -> int:
        """Number of (confidence, correct) pairs in the histogram (exact)."""
        return sum(self._exact()[0][C.HIST_COUNT])

    def bin_stats(self) -> dict[str, torch.Tensor]:
        """Per-bin float64 CPU tensors ``[n_bins]``: ``count``, ``confidence`` (mean),
        ``accuracy``, and the bin ``lower``/``upper`` edges; empty bins give NaN means.
        Means are computed from the exact integer sums (one rounding each)."""
        h, _ = self._exact()
        n, sc, sy = h[C.HIST_COUNT], h[C.HIST_SUM_CONF], h[C.HIST_SUM_CORRECT]
        scale = 1 << 32
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
        f64 = torch.float64
        return {
            "count": torch.tensor([float(c) for c in n], dtype=f64),
            "confidence": torch.tensor([a / (c * scale) if c else math.nan
                                        for a, c in zip(sc, n, strict=True)], dtype=f64),
            "accuracy": torch.tensor([a / c if c else math.nan
                                      for a, c in zip(sy, n, strict=True)], dtype=f64),
            "lower": edges[:-1],
            "upper": edges[1:],
        }

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("the CalibrationState is empty: add data with update/update_logits")

    def bin_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-bin ``(count, Σ confidence, Σ correct)``, float64 CPU tensors ``[n_bins]``:
        the exact integer sums, each rounded once to float64 (Σ confidence in probability
        units), the input of :func:`mllmcal.calibration.functional.ece_from_bins`."""
        h, _ = self._exact()
        n, sc, sy = (torch.tensor([float(v) for v in row], dtype=torch.float64)
                     for row in (h[C.HIST_COUNT], h[C.HIST_SUM_CONF], h[C.HIST_SUM_CORRECT]))
        return n, sc / C.CONF_FIXED_POINT_SCALE, sy

    def ece(self, norm: str = "l1") -> float:
        """Binned calibration error of the state: :func:`~mllmcal.calibration.functional.
        ece_from_bins` (``norm`` ``"l1"``, ``"l2"`` or ``"max"``) of :meth:`bin_sums`."""
        check_norm(norm)
        self._require_data()
        return ece_from_bins(*self.bin_sums(), norm)

    def _hist_sums(self) -> list[int]:
        """Exact ``[count, Σ confidence · 2**32, Σ correct]`` over all bins (data required)."""
        h, _ = self._exact()
        sums = [sum(row) for row in h]
        if sums[C.HIST_COUNT] == 0:
            self._require_data()
        return sums

    def accuracy(self) -> float:
        """Fraction of correct predictions."""
        sums = self._hist_sums()
        return sums[C.HIST_SUM_CORRECT] / sums[C.HIST_COUNT]

    def mean_confidence(self) -> float:
        """Average confidence (exact up to the 2**-33 rounding of each row)."""
        sums = self._hist_sums()
        return sums[C.HIST_SUM_CONF] / (sums[C.HIST_COUNT] << 32)

    def _require_scored(self) -> list[int]:
        _, t = self._exact()
        if t[_N_SCORED] == 0:
            raise ValueError(
                "no rows with a full distribution: NLL and Brier are accumulated only by "
                "update_logits, not by update(confidence, correct)"
            )
        return t

    def nll(self) -> float:
        """Mean negative log-likelihood (nats) of the rows added with :meth:`update_logits`;
        ``inf`` if any label had probability 0 (or an NLL above 2**31 nats)."""
        t = self._require_scored()
        if t[_N_NLL_FINITE] != t[_N_SCORED]:
            return math.inf
        return t[_SUM_NLL] / (t[_N_SCORED] << 24)

    def brier(self) -> float:
        """Mean multiclass Brier score Σ_i (p_i − 1[i=y])² of the rows added with
        :meth:`update_logits`."""
        t = self._require_scored()
        return t[_SUM_BRIER] / (t[_N_SCORED] << 30)

    def __repr__(self) -> str:
        return f"CalibrationState(n_bins={self.n_bins}, device={str(self.device)!r}, count={self.count})"
