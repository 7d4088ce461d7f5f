"""The calibration maths, once: input checks, binning, ECE from bins, two-limb fixed point.

Every stateful object of the package (:class:`~mllmcal.calibration.state.CalibrationState`,
the metric functions of :mod:`mllmcal.calibration.metrics`, the recalibration maps, the
``torchmetrics`` integration, the eval) calls these functions instead of writing the
formulas again, so a convention changes in one place (the layout torchmetrics uses:
``functional/`` owns the maths, the metric classes only hold state and call it).

Binning conventions (``docs/design.md``):

* uniform: bin ``min(floor(conf · n_bins), n_bins − 1)``, the product taken in the
  confidence's precision, at least fp32. For fp32 (and narrower) input this is
  :func:`mllmcal._contract.conf_bins`, the rule of the fused kernels, bit for bit.
* quantile (equal mass, "adaptive ECE"): sort by confidence, ties by correctness (so the
  result does not depend on input order); the sample of rank r (0-based) goes to bin
  ``floor(r · n_bins / n)``, so bin sizes differ by at most one.

Two-limb fixed point: every exact integer sum ``v`` of a calibration state is held as two
int64 numbers, ``v = hi · 2**LIMB_BITS + lo``. The fused kernels add into ``lo``;
:func:`carry_` moves ``lo``'s high bits into ``hi`` with a saturating add, so ``hi`` never
passes ``HI_LIMIT + 1`` (a sticky "overflowed" mark) and nothing ever wraps.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _contract as C

__all__ = [
    "BINNINGS", "NORMS", "LIMB_BITS", "LIMB_MASK", "HI_LIMIT", "MAX_VALUE",
    "NLL_FIXED_POINT_SCALE", "BRIER_FIXED_POINT_SCALE", "NLL_OVERFLOW_NATS",
    "check_choice", "check_n_bins", "check_norm", "check_binning", "check_pairs",
    "bin_index", "quantile_bin_index", "assign_bins", "bin_sums", "ece_from_bins", "ece_from_bins_batched",
    "saturating_add", "carry_",
]

NORMS = ("l1", "l2", "max")
BINNINGS = ("uniform", "quantile")

# ---------------------------------------------------------------- fixed point and limbs

LIMB_BITS = 32
LIMB_MASK = (1 << LIMB_BITS) - 1
# ``hi`` saturates at HI_LIMIT + 1; HI_LIMIT + 1 + 2**31 (the largest carry) < 2**63.
HI_LIMIT = 1 << 62
# The largest exact sum a state holds: (2**62 + 1) · 2**32 − 1 ≈ 2**94 units.
MAX_VALUE = HI_LIMIT * (1 << LIMB_BITS) + LIMB_MASK
NLL_FIXED_POINT_SCALE = 2.0**24
BRIER_FIXED_POINT_SCALE = 2.0**30
# A finite NLL above this many nats is counted as "overflow" (treated as infinite); it
# bounds one row's fixed-point NLL by 2**55, whose high 32 bits are summed into ``hi``.
NLL_OVERFLOW_NATS = 2.0**31


def saturating_add(hi: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """``min(hi + add, HI_LIMIT + 1)``, elementwise, for int64 ``0 <= hi <= HI_LIMIT + 1``
    and ``add >= 0`` of broadcastable shapes, computed without ever forming a sum above
    ``HI_LIMIT + 1`` (so nothing can wrap). Returns a new int64 tensor."""
    return hi + torch.minimum(add, (HI_LIMIT + 1) - hi)


def carry_(lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Move the bits of ``lo`` above ``2**LIMB_BITS`` into ``hi``, in place.

    ``lo`` and ``hi`` are int64 tensors of one shape on one device, the two limbs of
    ``hi · 2**32 + lo``; ``lo >= 0`` and ``0 <= hi <= HI_LIMIT + 1``. Afterwards
    ``lo < 2**32`` and ``hi`` has taken the carry with :func:`saturating_add`, so a sum past
    the limit stays marked (``hi > HI_LIMIT``) instead of wrapping. A few device ops, no
    host sync.
    """
    hi.copy_(saturating_add(hi, lo >> LIMB_BITS))
    lo.bitwise_and_(LIMB_MASK)


# ---------------------------------------------------------------- argument checks


def check_n_bins(n_bins: Any) -> int:
    """``n_bins`` if it is an int >= 1 (``TypeError`` for a non-int or bool,
    ``ValueError`` below 1)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return n_bins


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> Any:
    """``value`` if it is one of ``choices`` (``ValueError`` naming ``name`` otherwise)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_norm(norm: Any) -> str:
    """``norm`` if it is one of :data:`NORMS` (``ValueError`` otherwise)."""
    return check_choice("norm", norm, NORMS)


def check_binning(binning: Any) -> str:
    """``binning`` if it is one of :data:`BINNINGS` (``ValueError`` otherwise)."""
    return check_choice("binning", binning, BINNINGS)


def check_pairs(
    confidence: torch.Tensor, correct: torch.Tensor, *, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten and check a (confidence, correct) pair; returns ``([n] float, [n] bool)``.

    Confidences must lie in [0, 1] (NaN is rejected); ``correct`` is bool, or numbers that are
    0 or 1, with as many elements, on the same device. The confidence keeps its dtype.
    ``validate=False`` skips the value checks (they sync a GPU with the host).
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


# ---------------------------------------------------------------- binning


def bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Uniform bin of each confidence: ``min(floor(conf · n_bins), n_bins − 1)``.

    ``conf``: float tensor of any shape and device, values in [0, 1]. Returns int64 of the
    same shape. The product is taken in fp32 (exactly :func:`mllmcal._contract.conf_bins`,
    the fused kernels' rule) unless ``conf`` is float64, whose product stays in float64.
    """
    if conf.dtype == torch.float64:
        return torch.floor(conf * n_bins).long().clamp_(0, n_bins - 1)
    return C.conf_bins(conf, n_bins)


def quantile_bin_index(conf: torch.Tensor, correct: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-mass bin of each sample: rank r of ``n`` goes to ``floor(r · n_bins / n)``.

    ``conf`` float ``[..., n]``, ``correct`` ``[..., n]`` (bool or float 0/1), one device;
    each row along the last dimension is binned on its own (e.g. bootstrap replicates).
    Ranks order by confidence, ties by correctness, so the bins are a function of the
    multiset of pairs. Returns int64 ``[..., n]``.
    """
    n = conf.shape[-1]
    # Sort by correctness, then stably by confidence.
    o1 = torch.argsort(correct, dim=-1, stable=True)
    o2 = torch.argsort(conf.gather(-1, o1), dim=-1, stable=True)
    order = o1.gather(-1, o2)
    ranks = torch.arange(n, device=conf.device) * n_bins // max(n, 1)
    return torch.empty_like(order).scatter_(-1, order, ranks.expand_as(order).contiguous())


def assign_bins(conf: torch.Tensor, correct: torch.Tensor, n_bins: int,
                binning: str) -> torch.Tensor:
    """:func:`bin_index` (``"uniform"``) or :func:`quantile_bin_index` (``"quantile"``)."""
    if binning == "uniform":
        return bin_index(conf, n_bins)
    return quantile_bin_index(conf, correct, n_bins)


def bin_sums(
    confidence: torch.Tensor, correct: torch.Tensor, bins: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin ``(count, Σ confidence, Σ correct)``, float64 ``[n_bins]``, from float64
    ``confidence`` and ``correct`` ``[n]`` and int64 ``bins`` ``[n]`` (one device)."""
    z = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    return (
        z.clone().index_add_(0, bins, torch.ones_like(confidence)),
        z.clone().index_add_(0, bins, confidence),
        z.clone().index_add_(0, bins, correct),
    )


# ---------------------------------------------------------------- ECE


def ece_from_bins(
    count: torch.Tensor, sum_confidence: torch.Tensor, sum_correct: torch.Tensor,
    norm: str = "l1",
) -> float:
    """Binned calibration error from per-bin sums.

    ``count``, ``sum_confidence`` (in probability units) and ``sum_correct``: float64
    ``[n_bins]`` on one device, at least one bin non-empty. With ``acc_b − conf_b =
    (Σcorrect_b − Σconf_b) / n_b`` and ``N = Σ n_b``:

    * ``"l1"``: Σ_b (n_b/N)·|acc_b − conf_b| (ECE);
    * ``"l2"``: sqrt(Σ_b (n_b/N)·(acc_b − conf_b)²);
    * ``"max"``: max over non-empty bins of |acc_b − conf_b| (MCE).

    Returns a Python float.
    """
    nz = count > 0
    gap = (sum_correct[nz] - sum_confidence[nz]).abs() / count[nz]
    w = count[nz] / count.sum()
    if norm == "l1":
        return float((w * gap).sum())
    if norm == "l2":
        return float(torch.sqrt((w * gap.square()).sum()))
    return float(gap.max())


def ece_from_bins_batched(
    count: torch.Tensor, sum_confidence: torch.Tensor, sum_correct: torch.Tensor,
    n: int, norm: str = "l1",
) -> torch.Tensor:
    """:func:`ece_from_bins` of many histograms at once (e.g. bootstrap replicates).

    The arguments are float64 ``[r, n_bins]``, every row summing to ``n`` samples; returns
    float64 ``[r]``. Empty bins contribute 0 (their gap is masked, not indexed out, so the
    rows stay one tensor).
    """
    nz = count > 0
    gap = torch.where(nz, (sum_correct - sum_confidence).abs() / count.clamp_min(1),
                      torch.zeros_like(count))
    w = count / n
    if norm == "l1":
        return (w * gap).sum(1)
    if norm == "l2":
        return torch.sqrt((w * gap.square()).sum(1))
    return gap.amax(1)
