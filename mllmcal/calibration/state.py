"""A fixed-size, exactly mergeable calibration state that cannot overflow.

Every prediction lands in one of ``n_bins`` equal-width confidence bins on [0, 1]
(``bin = min(floor(conf * n_bins), n_bins - 1)``, product in fp32, as in DESIGN.md). Per bin
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
  into; below 2**30 rows it holds the whole value. Every row adds at most 2**32 to any ``lo`` entry (a confidence of 1.0 is 2**32 units;
  a row's NLL is split into its high and low 32 bits before summing), so a ``lo`` that starts
  below 2**32 holds at least 2**30 more rows before it could reach 2**63. The state counts, on
  the host and without reading the device, an upper bound on the rows added since the last
  carry, and carries (``hi += lo >> 32; lo &= 2**32 - 1``, a few device ops, no host sync)
  before that bound reaches 2**30 (and before every all_reduce).
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

Memory is ``2 · (3 · n_bins + 4)`` int64 numbers however many rows are added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import _contract as C
from ..ops import TokenStats, histogram_add_, token_stats

__all__ = [
    "CalibrationState", "NLL_FIXED_POINT_SCALE", "BRIER_FIXED_POINT_SCALE", "HI_LIMIT",
    "MAX_ROWS_PER_UPDATE",
]

NLL_FIXED_POINT_SCALE = 2.0**24
BRIER_FIXED_POINT_SCALE = 2.0**30
# A finite NLL above this many nats is counted as "overflow" (treated as infinite); it
# bounds one row's fixed-point NLL by 2**55, whose high 32 bits are summed into ``hi``.
NLL_OVERFLOW_NATS = 2.0**31
LIMB_BITS = 32
_LIMB_MASK = (1 << LIMB_BITS) - 1
# ``hi`` saturates at HI_LIMIT + 1; HI_LIMIT + 1 + 2**31 (the largest carry) < 2**63.
HI_LIMIT = 1 << 62
MAX_VALUE = HI_LIMIT * (1 << LIMB_BITS) + _LIMB_MASK
# Rows one update may add, and the bound on rows between carries: each row adds < 2**32 + 1
# to a lo entry (< 2**32 after a carry), so lo < 2**32 · (2**30 + 2**30 + 1) < 2**63.
MAX_ROWS_PER_UPDATE = 1 << 30
_CARRY_AT = 1 << 30
# totals layout: rows whose NLL was summed, rows scored, Σ NLL, Σ Brier (fixed point).
_N_NLL_FINITE, _N_SCORED, _SUM_NLL, _SUM_BRIER = range(4)
_FORMAT = "mllmcal.CalibrationState/2"
# Version 1 had the same keys with values limited to int64; it reads unchanged.
_FORMATS_READ = ("mllmcal.CalibrationState/1", _FORMAT)
_HIST_KEYS = ("count", "sum_confidence_fixed", "sum_correct")
_TOTAL_KEYS = ("n_scored", "sum_nll_fixed", "sum_brier_fixed", "n_nll_overflow")
_NORMS = ("l1", "l2", "max")
# Layout descriptor exchanged by all_reduce before the data (bump on any layout change).
_LAYOUT_VERSION = 2


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return n_bins


def _sat_add(hi: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """``min(hi + add, HI_LIMIT + 1)`` for 0 <= hi <= HI_LIMIT + 1 and add >= 0, computed
    without ever forming a sum above HI_LIMIT + 1 (so nothing can wrap)."""
    return hi + torch.minimum(add, (HI_LIMIT + 1) - hi)


def check_pairs(
    confidence: torch.Tensor, correct: torch.Tensor, *, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten and check a (confidence, correct) pair; returns ``([n] float, [n] bool)``.

    Confidences must lie in [0, 1] (NaN is rejected); ``correct`` is bool, or numbers that are
    0 or 1. ``validate=False`` skips the value checks (they sync a GPU with the host).
    """
    if not isinstance(confidence, torch.Tensor):
        confidence = torch.as_tensor(confidence)
    if not isinstance(correct, torch.Tensor):
        correct = torch.as_tensor(correct, device=confidence.device)
    if not confidence.is_floating_point():
        raise TypeError(f"confidence must be a floating-point tensor, got {confidence.dtype}")
    if confidence.numel() != correct.numel():
        raise ValueError(
            f"confidence and correct must have the same number of elements, got "
            f"{tuple(confidence.shape)} and {tuple(correct.shape)}"
        )
    if confidence.device != correct.device:
        raise ValueError(
            f"confidence is on {confidence.device} but correct is on {correct.device}"
        )
    c = confidence.reshape(-1)
    y = correct.reshape(-1)
    if validate and c.numel():
        bad = ~((c >= 0) & (c <= 1))  # NaN fails both comparisons
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"confidence must lie in [0, 1]; got {float(c[i])} at index {i}")
        if y.dtype != torch.bool and bool(((y != 0) & (y != 1)).any()):
            raise ValueError("correct must be bool or 0/1 values")
    return c, y.bool() if y.dtype != torch.bool else y


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        self.n_bins = _check_n_bins(n_bins)
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
        for lo, hi in ((self.hist, self.hist_hi), (self.totals, self.totals_hi)):
            hi.copy_(_sat_add(hi, lo >> LIMB_BITS))
            lo.bitwise_and_(_LIMB_MASK)
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
            correct: bool (or 0/1) tensor with the same number of elements, same device.
            validate: check value ranges (a host sync on GPU); pass False in hot loops.
        """
        c, y = check_pairs(confidence, correct, validate=validate)
        self._adopt(c.device)
        self._reserve(c.numel())
        c = c.float()
        histogram_add_(self.hist, c, y, torch.ones_like(y))

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
        self.totals += torch.cat((ok.sum(1), (fixed & _LIMB_MASK).sum(1)))
        self.totals_hi[2:] = _sat_add(self.totals_hi[2:], (fixed >> LIMB_BITS).sum(1))

    # ------------------------------------------------------------------ exact read-back

    def _check_not_saturated(self) -> None:
        """Raise OverflowError (naming the sum) if a hi limb passed its limit. Syncs."""
        over_h = (self.hist_hi > HI_LIMIT).any(1).cpu().tolist()
        over_t = (self.totals_hi > HI_LIMIT).cpu().tolist()
        names = [k for k, o in zip(_HIST_KEYS, over_h, strict=True) if o]
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
        """Set the state to the exact sums ``h`` ([3][n_bins]) and ``t`` ([4]), ints <= MAX_VALUE."""
        flat = [x for row in h for x in row] + list(t)
        lo = torch.tensor([x & _LIMB_MASK for x in flat], dtype=torch.int64)
        hi = torch.tensor([x >> LIMB_BITS for x in flat], dtype=torch.int64)
        nh = self.hist.numel()
        self.hist.copy_(lo[:nh].reshape(self.hist.shape))
        self.totals.copy_(lo[nh:])
        self.hist_hi.copy_(hi[:nh].reshape(self.hist.shape))
        self.totals_hi.copy_(hi[nh:])
        self._lo_rows = 1

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
        new_hi = [_sat_add(a, b) for a, b in ((self.hist_hi, other.hist_hi),
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
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "all_reduce needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        self._carry()
        saturated = int(bool((self.hist_hi > HI_LIMIT).any() | (self.totals_hi > HI_LIMIT).any()))
        # max of (x, -x) gives (max, -min): equal everywhere iff every rank has the same x.
        desc = torch.tensor(
            [self.n_bins, -self.n_bins, _LAYOUT_VERSION, -_LAYOUT_VERSION, saturated],
            dtype=torch.int64, device=self.device,
        )
        dist.all_reduce(desc, op=dist.ReduceOp.MAX, group=group)
        hi_bins, lo_bins, hi_ver, lo_ver, any_sat = desc.cpu().tolist()
        lo_bins, lo_ver = -lo_bins, -lo_ver
        if hi_bins != lo_bins or hi_ver != lo_ver:
            raise ValueError(
                "CalibrationState.all_reduce: the ranks' states have different layouts "
                f"(n_bins from {lo_bins} to {hi_bins}, layout version from {lo_ver} to "
                f"{hi_ver}; this rank has n_bins={self.n_bins}); every rank must use the "
                "same n_bins and mllmcal version"
            )
        if any_sat:
            raise OverflowError("CalibrationState.all_reduce: a rank's state has overflowed")
        lo = torch.cat((self.hist.reshape(-1), self.totals))
        hi = torch.cat((self.hist_hi.reshape(-1), self.totals_hi))
        packed = torch.cat((lo, hi >> 31, hi & ((1 << 31) - 1)))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        k = lo.numel()
        lo, hh, hl = packed[:k], packed[k:2 * k], packed[2 * k:]
        # hh ≤ 2**31 keeps hh·2**31 ≤ HI_LIMIT; anything above is past the limit.
        over = hh > (HI_LIMIT >> 31)
        hi = torch.where(over, HI_LIMIT + 1, _sat_add(hh.clamp(max=HI_LIMIT >> 31) << 31, hl))
        nh = self.hist.numel()
        self.hist.copy_(lo[:nh].reshape(3, self.n_bins))
        self.totals.copy_(lo[nh:])
        self.hist_hi.copy_(hi[:nh].reshape(3, self.n_bins))
        self.totals_hi.copy_(hi[nh:])
        self._carry()
        self._check_not_saturated()
        return self

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-serialisable) copy of the state with exact integer sums (Python
        ints, possibly above 2**63); equal data gives equal dicts."""
        h, t = self._exact()
        return {
            "format": _FORMAT,
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
        problems = _validate_dict(d)
        if problems:
            raise ValueError("invalid CalibrationState dict: " + "; ".join(problems))
        s = cls(d["n_bins"], device)
        s._device_fixed = device is not None
        h = [list(d[k]) for k in _HIST_KEYS]
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

    def ece(self, norm: str = "l1") -> float:
        """Binned calibration error of the state.

        ``"l1"``: Σ_b (n_b/N)·|acc_b − conf_b| (ECE); ``"l2"``: sqrt(Σ_b (n_b/N)·(acc_b −
        conf_b)²); ``"max"``: max over non-empty bins of |acc_b − conf_b| (MCE).
        """
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        self._require_data()
        b = self.bin_stats()
        nz = b["count"] > 0
        w = b["count"][nz] / b["count"].sum()
        gap = (b["accuracy"][nz] - b["confidence"][nz]).abs()
        if norm == "l1":
            return float((w * gap).sum())
        if norm == "l2":
            return float(torch.sqrt((w * gap.square()).sum()))
        return float(gap.max())

    def accuracy(self) -> float:
        """Fraction of correct predictions."""
        h, _ = self._exact()
        n = sum(h[C.HIST_COUNT])
        if n == 0:
            self._require_data()
        return sum(h[C.HIST_SUM_CORRECT]) / n

    def mean_confidence(self) -> float:
        """Average confidence (exact up to the 2**-33 rounding of each row)."""
        h, _ = self._exact()
        n = sum(h[C.HIST_COUNT])
        if n == 0:
            self._require_data()
        return sum(h[C.HIST_SUM_CONF]) / (n << 32)

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


def _validate_dict(d: Any) -> list[str]:
    """Every problem with a would-be :meth:`CalibrationState.to_dict` output (empty if none)."""
    if not isinstance(d, Mapping):
        raise TypeError(f"from_dict needs a dict, got {type(d).__name__}")
    problems: list[str] = []
    if d.get("format") not in _FORMATS_READ:
        return [f"format is {d.get('format')!r}, expected one of {_FORMATS_READ}"]
    expected = {"format", "n_bins", *_HIST_KEYS, *_TOTAL_KEYS}
    missing = sorted(expected - set(d))
    if missing:
        problems.append(f"missing keys {missing}")
    extra = sorted(set(d) - expected, key=str)
    if extra:
        problems.append(f"unexpected keys {extra}")
    if missing:
        return problems
    n_bins = d["n_bins"]
    if not _is_int(n_bins) or n_bins < 1:
        problems.append(f"n_bins must be an int >= 1, got {n_bins!r}")
        return problems
    lists = {}
    for key in _HIST_KEYS:
        v = d[key]
        if not isinstance(v, (list, tuple)):
            problems.append(f"{key} must be a list of {n_bins} ints, got {type(v).__name__}")
            continue
        if len(v) != n_bins:
            problems.append(f"{key} has {len(v)} entries, expected n_bins={n_bins}")
            continue
        bad = [(i, x) for i, x in enumerate(v) if not _is_int(x) or x < 0 or x > MAX_VALUE]
        if bad:
            i, x = bad[0]
            problems.append(
                f"{key}[{i}] = {x!r}: entries must be non-negative ints within the state's "
                f"limit 2**94 ({len(bad)} bad entries)"
            )
            continue
        lists[key] = v
    scalars = {}
    for key in _TOTAL_KEYS:
        x = d[key]
        if not _is_int(x) or x < 0 or x > MAX_VALUE:
            problems.append(f"{key} = {x!r}: must be a non-negative int within the state's "
                            "limit 2**94")
        else:
            scalars[key] = x
    if len(lists) == 3:
        n, sc, sy = (lists[k] for k in _HIST_KEYS)
        scale = 1 << 32
        for b in range(n_bins):
            if sy[b] > n[b]:
                problems.append(f"bin {b}: sum_correct {sy[b]} > count {n[b]}")
            # A confidence c in bin b has b <= fp32(c · n_bins) < b + 1 (or c = 1.0 in the
            # last bin); allow fp32 round-off (relative 2**-22) and the per-row 0.5-unit
            # rounding of c · 2**32.
            lo_edge = b / n_bins * (1 - 2.0**-22)
            hi_edge = 1.0 if b == n_bins - 1 else min(1.0, (b + 1) / n_bins * (1 + 2.0**-22))
            lo_sum = math.floor(n[b] * lo_edge * scale) - n[b]
            hi_sum = math.ceil(n[b] * hi_edge * scale) + n[b]
            if not lo_sum <= sc[b] <= min(hi_sum, n[b] * scale):
                problems.append(
                    f"bin {b}: sum_confidence_fixed {sc[b]} is outside what {n[b]} confidences "
                    f"in [{b}/{n_bins}, {b + 1}/{n_bins}] can sum to"
                )
    if len(scalars) == 4:
        n_sc, n_over = scalars["n_scored"], scalars["n_nll_overflow"]
        if n_over > n_sc:
            problems.append(f"n_nll_overflow {n_over} > n_scored {n_sc}")
        if len(lists) == 3 and n_sc > sum(lists["count"]):
            problems.append(f"n_scored {n_sc} > total count {sum(lists['count'])} (every "
                            "scored row is also in the histogram)")
        if scalars["sum_brier_fixed"] > n_sc * (2 << 30) + n_sc:
            problems.append(f"sum_brier_fixed {scalars['sum_brier_fixed']} exceeds 2 per "
                            f"scored row ({n_sc} rows)")
        n_finite = max(0, n_sc - n_over)
        if scalars["sum_nll_fixed"] > n_finite * (int(NLL_OVERFLOW_NATS) << 24) + n_finite:
            problems.append(f"sum_nll_fixed {scalars['sum_nll_fixed']} exceeds 2**31 nats per "
                            f"row with a finite NLL ({n_finite} rows)")
    return problems
