"""Post-hoc recalibration maps for confidences: histogram binning and isotonic regression.

Both learn a map confidence → probability of being correct from held-out (confidence,
correct) pairs with ``fit`` and apply it with ``transform``. They work on tensors on any
device; fitting is done in float64 on the CPU (the fitted maps are small).
"""

from __future__ import annotations

import torch

from .functional import assign_bins, bin_index, bin_sums, check_binning, check_n_bins, check_pairs

__all__ = ["HistogramBinning", "IsotonicRegression", "pav"]


def _fit_pairs(confidence, correct) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, y = check_pairs(confidence, correct)
    if c.numel() == 0:
        raise ValueError("cannot fit a recalibration map on no data (0 samples)")
    return c.cpu(), c.cpu().double(), y.cpu().double()


def _check_confidence(confidence: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(confidence)
    if not c.is_floating_point():
        raise TypeError(f"confidence must be a floating-point tensor, got {c.dtype}")
    if c.numel() and not bool(((c >= 0) & (c <= 1)).all()):
        raise ValueError("confidence must lie in [0, 1]")
    return c


class HistogramBinning:
    """Histogram binning (Zadrozny & Elkan 2001): each bin maps to its observed accuracy.

    Args:
        n_bins: number of bins (>= 1).
        binning: ``"uniform"`` (equal width on [0, 1]) or ``"quantile"`` (equal mass on the
            fitting data; the bin edges are then the midpoints between neighbouring bins'
            extreme confidences).

    A bin with no fitting samples maps to the mean confidence it would cover (its centre),
    i.e. it leaves those confidences roughly unchanged.
    """

    def __init__(self, n_bins: int = 15, binning: str = "uniform") -> None:
        self.n_bins = check_n_bins(n_bins)
        self.binning = check_binning(binning)
        self.edges: torch.Tensor | None = None  # float64 [n_bins - 1] inner edges
        self.values: torch.Tensor | None = None  # float64 [n_bins]

    def fit(self, confidence: torch.Tensor, correct: torch.Tensor) -> HistogramBinning:
        """Learn per-bin accuracies from ``[n]`` confidences in [0, 1] and bool correctness."""
        raw, c, y = _fit_pairs(confidence, correct)
        nb = self.n_bins
        b = assign_bins(raw, y, nb, self.binning)
        cnt, _, hits = bin_sums(c, y, b, nb)
        acc = hits / cnt.clamp_min(1)
        if self.binning == "uniform":
            self.edges = torch.arange(1, nb, dtype=torch.float64) / nb
            centre = (torch.arange(nb, dtype=torch.float64) + 0.5) / nb
        else:
            lo = torch.full((nb,), torch.inf, dtype=torch.float64).scatter_reduce_(0, b, c, "amin")
            hi = torch.full((nb,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, b, c, "amax")
            # Empty quantile bins (n < n_bins) borrow the neighbouring edge.
            hi = torch.cummax(torch.where(cnt > 0, hi, torch.zeros_like(hi)), 0).values
            lo_f = torch.where(cnt > 0, lo, torch.ones_like(lo)).flip(0)
            lo = torch.cummin(lo_f, 0).values.flip(0)
            self.edges = 0.5 * (hi[:-1] + lo[1:])
            full = torch.cat((torch.zeros(1, dtype=torch.float64), self.edges,
                              torch.ones(1, dtype=torch.float64)))
            centre = 0.5 * (full[:-1] + full[1:])
        self.values = torch.where(cnt > 0, acc, centre)
        return self

    def transform(self, confidence: torch.Tensor) -> torch.Tensor:
        """Recalibrated probabilities, same shape/device as ``confidence``, float64."""
        if self.values is None:
            raise RuntimeError("HistogramBinning is not fitted: call fit(confidence, correct) first")
        c = _check_confidence(confidence)
        if self.binning == "uniform":
            b = bin_index(c, self.n_bins)
        else:
            b = torch.bucketize(c.double(), self.edges.to(c.device), right=True)
        return self.values.to(c.device)[b]


def pav(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pool-adjacent-violators: the nondecreasing sequence closest to ``y`` in weighted L2.

    ``y``, ``w``: float64 ``[m]`` (already in order of the covariate, weights > 0). Returns
    float64 ``[m]``. O(m): each element is pushed once and merged at most once.
    """
    vals: list[float] = []
    wts: list[float] = []
    lens: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist(), strict=True):
        vals.append(yi)
        wts.append(wi)
        lens.append(1)
        # Merge while the last block violates monotonicity; a merged block takes the
        # weighted mean, which is the L2 optimum for a block constrained to be constant.
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w2 = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w2
            wts[-2] = w2
            lens[-2] += lens[-1]
            del vals[-1], wts[-1], lens[-1]
    return torch.repeat_interleave(
        torch.tensor(vals, dtype=torch.float64), torch.tensor(lens, dtype=torch.long)
    )


class IsotonicRegression:
    """Isotonic regression recalibration (Zadrozny & Elkan 2002), fitted with PAV.

    ``fit`` pools tied confidences (weight = count, value = their accuracy), runs PAV to get
    a nondecreasing step function, and ``transform`` interpolates it linearly between the
    distinct fitted confidences, clamping outside their range (as common implementations do).
    """

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None  # float64 [m] distinct confidences, increasing
        self.y: torch.Tensor | None = None  # float64 [m] fitted, nondecreasing

    def fit(self, confidence: torch.Tensor, correct: torch.Tensor) -> IsotonicRegression:
        """Fit on ``[n]`` confidences in [0, 1] and bool/0-1 correctness."""
        _, c, y = _fit_pairs(confidence, correct)
        xs, inv, cnt = torch.unique(c, return_inverse=True, return_counts=True)
        sums = torch.zeros_like(xs).index_add_(0, inv, y)
        self.x = xs
        self.y = pav(sums / cnt, cnt.double())
        return self

    def transform(self, confidence: torch.Tensor) -> torch.Tensor:
        """Recalibrated probabilities, same shape/device as ``confidence``, float64."""
        if self.x is None:
            raise RuntimeError("IsotonicRegression is not fitted: call fit(confidence, correct) first")
        c = _check_confidence(confidence)
        xs, ys = self.x.to(c.device), self.y.to(c.device)
        q = c.double().clamp(xs[0], xs[-1])
        if xs.numel() == 1:
            return ys.expand_as(q).clone()
        i = torch.searchsorted(xs, q, right=True).clamp(1, xs.numel() - 1)
        x0, x1 = xs[i - 1], xs[i]
        y0, y1 = ys[i - 1], ys[i]
        frac = (q - x0) / (x1 - x0)
        return y0 + frac * (y1 - y0)
