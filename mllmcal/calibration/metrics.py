"""Calibration and selective-prediction metrics on tensors (any device) or on a state.

Every function takes ``confidence`` (float ``[n]`` in [0, 1]) and ``correct`` (bool or 0/1
``[n]``), flattens them, and computes in float64 on their device (MPS, which has no float64,
is moved to the CPU). Functions marked "state-aware" also accept a
:class:`~mllmcal.calibration.state.CalibrationState` in place of the pair, so they stream.

Binning (``"uniform"`` or ``"quantile"``), the ECE of a histogram and the input checks are
the functions of :mod:`mllmcal.calibration.functional` (see it for the conventions); this
module computes metrics with them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..ops import token_stats
from .functional import (
    assign_bins,
    bin_sums,
    check_binning,
    check_n_bins,
    check_norm,
    check_pairs,
    ece_from_bins,
    ece_from_bins_batched,
)
from .state import CalibrationState

__all__ = [
    "ece",
    "debiased_l2_ece",
    "smooth_ece",
    "brier_score",
    "multiclass_brier_score",
    "nll",
    "accuracy",
    "auroc",
    "risk_coverage_curve",
    "aurc",
    "ece_bootstrap_ci",
    "BootstrapCI",
]


# --------------------------------------------------------------------------- helpers


def _pairs(confidence, correct, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw float confidence, float64 confidence, float64 correctness), all ``[n]``, n > 0
    (``what``: the metric, for the error)."""
    if correct is None:
        raise TypeError("correct is required unless the first argument is a CalibrationState")
    c, y = check_pairs(confidence, correct)
    _require_nonempty(c.numel(), what)
    if c.device.type == "mps":
        c, y = c.cpu(), y.cpu()
    return c, c.double(), y.double()


def _require_nonempty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"cannot compute the {what} of no data (got 0 samples)")


def _check_bins(n_bins: int, binning: str) -> None:
    check_n_bins(n_bins)
    check_binning(binning)


# --------------------------------------------------------------------------- binned ECE


def ece(
    confidence: torch.Tensor | CalibrationState,
    correct: torch.Tensor | None = None,
    n_bins: int = 15,
    norm: str = "l1",
    binning: str = "uniform",
) -> float:
    """Binned expected calibration error (state-aware).

    ``l1``: Σ_b (n_b/N)·|acc_b − conf_b|; ``l2``: sqrt(Σ_b (n_b/N)·(acc_b − conf_b)²);
    ``max``: max over non-empty bins of |acc_b − conf_b| (MCE).

    Args:
        confidence: float ``[n]`` in [0, 1], or a :class:`CalibrationState` (then
            ``n_bins``/``binning`` come from the state: uniform with its own bins).
        correct: bool or 0/1 ``[n]``.
        n_bins: number of bins (>= 1).
        norm: ``"l1"``, ``"l2"`` or ``"max"``.
        binning: ``"uniform"`` or ``"quantile"`` (equal mass).

    Returns:
        a Python float.
    """
    check_norm(norm)
    if isinstance(confidence, CalibrationState):
        return confidence.ece(norm)
    _check_bins(n_bins, binning)
    raw, c, y = _pairs(confidence, correct, "ECE")
    return ece_from_bins(*bin_sums(c, y, assign_bins(raw, y, n_bins, binning), n_bins), norm)


def debiased_l2_ece(
    confidence: torch.Tensor | CalibrationState,
    correct: torch.Tensor | None = None,
    n_bins: int = 15,
    binning: str = "quantile",
    squared: bool = False,
) -> float:
    """Debiased binned L2 calibration error of Kumar, Liang & Ma (2019), state-aware.

    The plug-in Σ_b (n_b/N)(conf_b − acc_b)² is biased upwards by the sampling noise of
    acc_b. Each bin's term is corrected by subtracting that noise's variance estimate:

        CE² = Σ_b (n_b/N) · [(conf_b − acc_b)² − acc_b(1 − acc_b)/(n_b − 1)],

    with bins of fewer than 2 samples contributing 0. The squared estimate can be negative;
    the L2 error returned is ``sqrt(max(CE², 0))`` (``squared=True`` returns CE² as is).
    Kumar et al. use equal-mass bins, hence the default ``binning="quantile"``; a state
    provides its uniform bins.
    """
    if isinstance(confidence, CalibrationState):
        confidence._require_data()
        n, sc, sy = confidence.bin_sums()
    else:
        _check_bins(n_bins, binning)
        raw, c, y = _pairs(confidence, correct, "debiased ECE")
        n, sc, sy = bin_sums(c, y, assign_bins(raw, y, n_bins, binning), n_bins)
    big = n >= 2
    nb = n[big]
    acc = sy[big] / nb
    conf = sc[big] / nb
    terms = (conf - acc).square() - acc * (1 - acc) / (nb - 1)
    sq = float((nb / n.sum() * terms).sum())
    return sq if squared else math.sqrt(max(sq, 0.0))


# --------------------------------------------------------------------------- smooth ECE


def _grid_deposit(pos: torch.Tensor, val: torch.Tensor, g: int) -> torch.Tensor:
    """Spread ``val`` at positions ``pos`` in [0, 1] onto ``g`` nodes ``k/(g-1)`` linearly."""
    x = pos.clamp(0, 1) * (g - 1)
    i = torch.floor(x).long().clamp_(0, g - 2)
    frac = x - i
    out = torch.zeros(g, dtype=torch.float64)
    out.index_add_(0, i, (1 - frac) * val)
    out.index_add_(0, i + 1, frac * val)
    return out


def _smooth_ece_sigma(r_grid: torch.Tensor, sigma: float) -> float:
    """∫_0^1 |Σ_j K_σ(t, s_j) r_j| dt for residual mass ``r_grid`` on the nodes ``s_j``.

    K_σ is the Gaussian reflected at 0 and 1: K_σ(t, s) = Σ_k φ_σ(t − s + 2k) + φ_σ(t + s + 2k).
    That is ordinary Gaussian smoothing on a circle of circumference 2 of the mirrored
    signal (mass at s and at −s ≡ 2 − s), so it is one circular convolution, done by FFT;
    the kernel itself is periodised over images too, so wide kernels stay exact.
    """
    g = r_grid.numel()
    m = 2 * (g - 1)
    h = 1.0 / (g - 1)
    u = torch.zeros(m, dtype=torch.float64)
    u[:g] = r_grid
    u[g:] = r_grid[1 : g - 1].flip(0)
    # A node at 0 or 1 is its own mirror image: both images land on it.
    u[0] *= 2
    u[g - 1] *= 2
    d = torch.arange(m, dtype=torch.float64) * h
    d = torch.minimum(d, 2 - d)  # circular distance
    images = torch.arange(-3, 4, dtype=torch.float64)
    dist = d[:, None] + 2 * images[None, :]
    ker = torch.exp(-0.5 * (dist / sigma).square()).sum(1) / (sigma * math.sqrt(2 * math.pi))
    smooth = torch.fft.irfft(torch.fft.rfft(u) * torch.fft.rfft(ker), n=m)[:g]
    w = torch.full((g,), h, dtype=torch.float64)
    w[0] = w[-1] = h / 2  # trapezoid rule on [0, 1]
    return float((smooth.abs() * w).sum())


def smooth_ece(
    confidence: torch.Tensor | CalibrationState,
    correct: torch.Tensor | None = None,
    *,
    return_sigma: bool = False,
    eps: float = 1e-3,
    tol: float = 1e-5,
) -> float | tuple[float, float]:
    """SmoothECE (smECE) of Błasiok & Nakkiran (2023), with their bandwidth rule; state-aware.

    smECE_σ = ∫_0^1 |(1/n) Σ_i K_σ(t, f_i)(y_i − f_i)| dt, with K_σ the Gaussian kernel of
    width σ reflected at 0 and 1. The bandwidth is the fixed point σ* = smECE_σ*, found by
    bisection on [eps, 1] (smECE_σ − σ is decreasing in σ); if smECE_eps < eps, σ* = eps.

    Samples are placed on a uniform grid of ``G >= max(2001, 20/σ)`` nodes by linear
    interpolation (as the authors' reference implementation does), which makes the cost
    O(n + G log G) per σ. A :class:`CalibrationState` contributes each bin's residual
    Σ(y − f) at the bin's mean confidence; with a fine state (e.g. ``n_bins=1000``) this
    agrees with the raw-pair value to about the bin width, and it streams.

    Returns:
        smECE (a float), or ``(smECE, σ*)`` with ``return_sigma=True``.
    """
    if isinstance(confidence, CalibrationState):
        confidence._require_data()
        n_b, sc, sy = confidence.bin_sums()
        nz = n_b > 0
        pos, res, n = sc[nz] / n_b[nz], sy[nz] - sc[nz], float(n_b.sum())
    else:
        _, c, y = _pairs(confidence, correct, "smooth ECE")
        pos, res, n = c.cpu(), (y - c).cpu(), float(c.numel())
    cache: dict[int, torch.Tensor] = {}

    def at(sigma: float) -> float:
        g = max(2001, int(math.ceil(20.0 / sigma)) + 1)
        if g not in cache:
            cache[g] = _grid_deposit(pos, res, g) / n
        return _smooth_ece_sigma(cache[g], sigma)

    lo, hi = eps, 1.0
    if at(lo) <= lo:
        sigma = lo
    elif at(hi) >= hi:
        sigma = hi
    else:
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            if at(mid) > mid:
                lo = mid
            else:
                hi = mid
        sigma = 0.5 * (lo + hi)
    value = at(sigma)
    return (value, sigma) if return_sigma else value


# --------------------------------------------------------------------------- scores


def brier_score(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Top-label (binary) Brier score: mean (conf − correct)². See
    :func:`multiclass_brier_score` for the full-distribution version."""
    _, c, y = _pairs(confidence, correct, "Brier score")
    return float((c - y).square().mean())


def _scored_rows(logits, labels, temperature, backend):
    if labels is None:
        raise ValueError("labels are required")
    s = token_stats(logits, labels, temperature, backend)
    keep = ~torch.isnan(s.brier.reshape(-1))
    if not bool(keep.any()):
        raise ValueError("no valid, labelled rows (every row is invalid or has an ignored label)")
    return s, keep


def multiclass_brier_score(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0,
    backend: str = "auto",
) -> float:
    """Mean Σ_i (p_i − 1[i = y])² of ``softmax(logits / T)`` over valid, labelled rows.

    ``logits`` is ``[..., V]``, ``labels`` integer ``[...]`` (``-100`` ignored); one fused pass.
    """
    s, keep = _scored_rows(logits, labels, temperature, backend)
    return float(s.brier.reshape(-1)[keep].double().mean())


def nll(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0,
    backend: str = "auto",
) -> float:
    """Mean negative log-likelihood (nats) of the labels under ``softmax(logits / T)``, full
    vocabulary, over valid, labelled rows (``inf`` if a label has probability 0)."""
    s, keep = _scored_rows(logits, labels, temperature, backend)
    return float(-s.label_logprob.reshape(-1)[keep].double().mean())


def accuracy(correct: torch.Tensor | CalibrationState) -> float:
    """Fraction correct, from a bool/0-1 tensor or a state."""
    if isinstance(correct, CalibrationState):
        return correct.accuracy()
    y = torch.as_tensor(correct).reshape(-1)
    _require_nonempty(y.numel(), "accuracy")
    if y.dtype != torch.bool and bool(((y != 0) & (y != 1)).any()):
        raise ValueError("correct must be bool or 0/1 values")
    return float(y.double().mean())


# --------------------------------------------------------------------------- ranking


def auroc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the ROC curve of confidence as a score for correctness.

    The Mann–Whitney statistic P(conf_correct > conf_wrong) + ½ P(tie), computed from
    average ranks in O(n log n). Needs both correct and wrong samples.
    """
    _, c, y = _pairs(confidence, correct, "AUROC")
    n_pos = float(y.sum())
    n_neg = c.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both correct and incorrect samples")
    uniq, inv, counts = torch.unique(c, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: ties share the mean of their ranks.
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    rank_sum = float(avg_rank[inv][y > 0].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def risk_coverage_curve(
    confidence: torch.Tensor, correct: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective risk at every coverage, accepting the most confident samples first.

    Returns ``(coverage, risk)``, float64 ``[n]``: at coverage k/n, ``risk`` is the expected
    error rate of the k most confident samples, where samples tied in confidence are taken
    in a uniformly random order (so a tie group of m samples with e errors adds e/m expected
    errors per sample taken, and the curve does not depend on input order).
    """
    _, c, y = _pairs(confidence, correct, "risk-coverage curve")
    n = c.numel()
    uniq, inv, counts = torch.unique(c, return_inverse=True, return_counts=True)
    errors = torch.zeros_like(uniq).index_add_(0, inv, 1 - y)
    # Walk tie groups from the most confident down.
    counts, errors = counts.flip(0), errors.flip(0)
    rate = errors / counts.double()
    per_sample_err = torch.repeat_interleave(rate, counts)
    k = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)
    risk = torch.cumsum(per_sample_err, 0) / k
    return k / n, risk


def aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk-coverage curve: (1/n) Σ_k risk(k/n) (Geifman & El-Yaniv 2018),
    with ties in confidence taken in expectation over their order."""
    _, risk = risk_coverage_curve(confidence, correct)
    return float(risk.mean())


# --------------------------------------------------------------------------- bootstrap


class BootstrapCI(NamedTuple):
    estimate: float
    low: float
    high: float


def ece_bootstrap_ci(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    n_bins: int = 15,
    norm: str = "l1",
    binning: str = "uniform",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap confidence interval for :func:`ece`.

    Resamples the n pairs with replacement ``n_boot`` times; replicate i uses row i of
    ``torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed))``
    (on the CPU). That matrix is drawn and evaluated in chunks of about 2**22 indices (the
    CPU generator gives the same stream chunked or not), so memory stays bounded for large
    n. The interval is the (α/2, 1 − α/2) quantiles (linear interpolation) of the
    replicate ECEs.

    Returns:
        ``BootstrapCI(estimate, low, high)``: the ECE of the data and the interval.
    """
    check_norm(norm)
    _check_bins(n_bins, binning)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    raw, c, y = _pairs(confidence, correct, "ECE bootstrap")
    n = c.numel()
    estimate = ece(confidence, correct, n_bins, norm, binning)
    raw, c, y = raw.cpu(), c.cpu(), y.cpu()
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, (1 << 22) // n)
    values = []
    for i0 in range(0, n_boot, chunk):
        r = min(chunk, n_boot - i0)
        idx = torch.randint(0, n, (r, n), generator=gen)
        cr, yr = c[idx], y[idx]
        # Quantile bins are per replicate: rank within the replicate, ties by correctness.
        b = assign_bins(raw[idx], yr, n_bins, binning)
        flat = (b + torch.arange(r)[:, None] * n_bins).reshape(-1)
        size = r * n_bins
        cnt = torch.bincount(flat, minlength=size).double().reshape(r, n_bins)
        sc = torch.bincount(flat, cr.reshape(-1), minlength=size).reshape(r, n_bins)
        sy = torch.bincount(flat, yr.reshape(-1), minlength=size).reshape(r, n_bins)
        values.append(ece_from_bins_batched(cnt, sc, sy, n, norm))
    v = torch.cat(values)
    q = torch.quantile(v, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    return BootstrapCI(estimate, float(q[0]), float(q[1]))
