"""A fixed-size, exactly mergeable calibration state.

Every prediction lands in one of ``n_bins`` equal-width confidence bins on [0, 1]
(``bin = min(floor(conf * n_bins), n_bins - 1)``, product in fp32, as in DESIGN.md). Per bin
the state keeps three int64 numbers: the count, Σ confidence in units of 2**-32 and
Σ correct. Besides the histogram it keeps four int64 totals for the rows scored through
:meth:`CalibrationState.update_logits` (the number of rows with a full distribution, Σ NLL in
units of 2**-24, Σ Brier in units of 2**-30 and the number of rows whose NLL is infinite or
above 2**31 nats). Each row's NLL and Brier value is rounded to its fixed-point integer as
floor(x·scale + 0.5) in fp32 (exact products: the scales are powers of two) after clamping
fp32 round-off below 0 to 0.

Why integers: a float sum depends on the order of its terms, so two processes that saw the
same tokens in a different split would disagree in the last bits. Each row's value is rounded
to its fixed-point integer once, deterministically, and integer addition is associative, so
any split of the same rows, merged in any order, gives bit-identical state. Memory is
``3 * n_bins + 4`` int64 numbers however many rows are added.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _contract as C
from ..ops import TokenStats, token_stats

__all__ = ["CalibrationState", "NLL_FIXED_POINT_SCALE", "BRIER_FIXED_POINT_SCALE"]

NLL_FIXED_POINT_SCALE = 2.0**24
BRIER_FIXED_POINT_SCALE = 2.0**30
# A finite NLL above this many nats is counted as "overflow" (treated as infinite): its
# fixed-point value would not leave room to sum ~2**7 such rows in an int64.
NLL_OVERFLOW_NATS = 2.0**31
# totals layout: rows whose NLL was summed, rows scored, Σ NLL, Σ Brier (fixed point).
_N_NLL_FINITE, _N_SCORED, _SUM_NLL, _SUM_BRIER = range(4)
_FORMAT = "mllmcal.CalibrationState/1"
_NORMS = ("l1", "l2", "max")


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return n_bins


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


class CalibrationState:
    """Streaming calibration histogram with O(n_bins) memory and exact merges.

    Args:
        n_bins: number of equal-width confidence bins on [0, 1] (>= 1).
        device: where the int64 state tensors live. ``None`` means "the device of the first
            data it sees" (CPU until then); updates with data on another device are an error.

    The tensors are ``hist`` (int64 ``[3, n_bins]``: count, Σ confidence · 2**32, Σ correct;
    the layout ``token_stats(histogram=...)`` fills) and ``totals`` (int64 ``[4]``). Nothing in
    :meth:`update_logits` synchronises with the host, so it can sit in a decode loop; the
    metric methods (:meth:`ece`, :meth:`accuracy`, ...) read the tensors back and return floats.

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

    def _adopt(self, device: torch.device) -> None:
        """Move an unpinned state to ``device`` on first use, or reject a device mismatch."""
        if device == self.device:
            self._device_fixed = True
            return
        if not self._device_fixed:
            self.hist = self.hist.to(device)
            self.totals = self.totals.to(device)
            self._consts_t = None
            self._device_fixed = True
            return
        raise ValueError(
            f"this CalibrationState lives on {self.device} but the data is on {device}; "
            f"create it with device={str(device)!r} or move the data"
        )

    def reset(self) -> CalibrationState:
        """Forget all data (keeps ``n_bins`` and the device)."""
        self.hist.zero_()
        self.totals.zero_()
        return self

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant: ``8 * (3 * n_bins + 4)``)."""
        return self.hist.numel() * self.hist.element_size() + (
            self.totals.numel() * self.totals.element_size()
        )

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
        c = c.float()
        C.hist_add_(self.hist, c, y, torch.ones_like(y))

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
        stats = token_stats(
            logits, labels, temperature, backend, ignore_index=ignore_index,
            histogram=self.hist, validate=validate,
        )
        self._add_scores(stats.label_logprob.reshape(-1), stats.brier.reshape(-1))
        return stats

    def _add_scores(self, label_logprob: torch.Tensor, brier: torch.Tensor) -> None:
        # Brier is NaN exactly on the rows the histogram skipped (invalid or ignored label);
        # label_logprob is additionally -inf where the label token was masked.
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
        self.totals += torch.cat((ok.sum(1), fixed.sum(1)))

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
        """Add ``other``'s data to this state (exact; the result does not depend on order)."""
        self._check_compatible(other)
        self.hist += other.hist
        self.totals += other.totals
        return self

    def __add__(self, other: CalibrationState) -> CalibrationState:
        return self.copy().merge(other)

    def copy(self) -> CalibrationState:
        out = CalibrationState(self.n_bins, self.device)
        out._device_fixed = self._device_fixed
        out.hist.copy_(self.hist)
        out.totals.copy_(self.totals)
        return out

    def all_reduce(self, group: Any = None) -> CalibrationState:
        """Sum this state over all ranks of a ``torch.distributed`` process group, in place.

        One collective on a packed int64 tensor of ``3 * n_bins + 4`` numbers; every rank must
        call it with the same ``n_bins``. The state's device must suit the backend (CPU for
        gloo, CUDA for NCCL). Integer sums make the result identical to a single pass.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "all_reduce needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        packed = torch.cat((self.hist.reshape(-1), self.totals))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        k = self.hist.numel()
        self.hist.copy_(packed[:k].reshape(3, self.n_bins))
        self.totals.copy_(packed[k:])
        return self

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-serialisable) copy of the state; equal data gives equal dicts."""
        h = self.hist.cpu().tolist()
        t = self.totals.cpu().tolist()
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
        cls, d: dict[str, Any], device: torch.device | str | None = None
    ) -> CalibrationState:
        """Rebuild a state from :meth:`to_dict` output (optionally on another device)."""
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a CalibrationState dict (format {d.get('format')!r})")
        s = cls(int(d["n_bins"]), device)
        s._device_fixed = device is not None
        keys = ("count", "sum_confidence_fixed", "sum_correct")
        for row, key in enumerate(keys):
            vals = d[key]
            if len(vals) != s.n_bins:
                raise ValueError(f"{key!r} has {len(vals)} entries, expected n_bins={s.n_bins}")
            s.hist[row] = torch.tensor(vals, dtype=torch.int64)
        s.totals.copy_(
            torch.tensor(
                [d["n_scored"] - d["n_nll_overflow"], d["n_scored"], d["sum_nll_fixed"],
                 d["sum_brier_fixed"]],
                dtype=torch.int64,
            )
        )
        return s

    # ------------------------------------------------------------------ metrics

    @property
    def count(self) -> int:
        """Number of (confidence, correct) pairs in the histogram."""
        return int(self.hist[C.HIST_COUNT].sum())

    def bin_stats(self) -> dict[str, torch.Tensor]:
        """Per-bin float64 CPU tensors ``[n_bins]``: ``count``, ``confidence`` (mean),
        ``accuracy``, and the bin ``lower``/``upper`` edges; empty bins give NaN means."""
        h = self.hist.cpu().double()
        n = h[C.HIST_COUNT]
        safe = n.clamp_min(1)
        nan = torch.full_like(n, math.nan)
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
        return {
            "count": n,
            "confidence": torch.where(n > 0, h[C.HIST_SUM_CONF] / C.CONF_FIXED_POINT_SCALE / safe, nan),
            "accuracy": torch.where(n > 0, h[C.HIST_SUM_CORRECT] / safe, nan),
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
        self._require_data()
        return float(self.hist[C.HIST_SUM_CORRECT].sum()) / self.count

    def mean_confidence(self) -> float:
        """Average confidence (exact up to the 2**-33 rounding of each row)."""
        self._require_data()
        return float(self.hist[C.HIST_SUM_CONF].sum().double() / C.CONF_FIXED_POINT_SCALE) / self.count

    def _require_scored(self) -> int:
        n = int(self.totals[_N_SCORED])
        if n == 0:
            raise ValueError(
                "no rows with a full distribution: NLL and Brier are accumulated only by "
                "update_logits, not by update(confidence, correct)"
            )
        return n

    def nll(self) -> float:
        """Mean negative log-likelihood (nats) of the rows added with :meth:`update_logits`;
        ``inf`` if any label had probability 0 (or an NLL above 2**31 nats)."""
        n = self._require_scored()
        if int(self.totals[_N_NLL_FINITE]) != n:
            return math.inf
        return float(self.totals[_SUM_NLL].double() / NLL_FIXED_POINT_SCALE) / n

    def brier(self) -> float:
        """Mean multiclass Brier score Σ_i (p_i − 1[i=y])² of the rows added with
        :meth:`update_logits`."""
        n = self._require_scored()
        return float(self.totals[_SUM_BRIER].double() / BRIER_FIXED_POINT_SCALE) / n

    def __repr__(self) -> str:
        return f"CalibrationState(n_bins={self.n_bins}, device={str(self.device)!r}, count={self.count})"
