"""A ``torchmetrics`` drop-in for ``MulticlassCalibrationError`` with O(n_bins) memory.

``torchmetrics.classification.MulticlassCalibrationError`` keeps every prediction's
confidence and correctness (two float tensors growing with the data) and bins them at
``compute``. :class:`CalibrationError` keeps the histogram instead: per bin a count,
Σ confidence (fixed point, units of 2**-32) and Σ correct, as exact integers (the layout
and two-limb overflow handling of :class:`mllmcal.CalibrationState`). Its states are
reduced by sum, so ``torchmetrics`` syncs them across processes (and Lightning logs them)
like any other metric, in ``2 · 3 · n_bins`` int64 numbers however many tokens are scored.

Logits go through :func:`mllmcal.token_stats`, which fills the histogram in the same pass
without materialising a ``[N, C]`` probability tensor (useful for token-level calibration
over an LLM vocabulary).

Where it differs from ``MulticlassCalibrationError``:

* **Confidence exactly 1.0.** torchmetrics bins with ``bucketize(conf, linspace(0, 1,
  n_bins + 1), right=True) - 1``, which puts conf == 1.0 in an extra, (n_bins+1)-th bin of
  its own; here it lands in the last bin (``min(floor(conf · n_bins), n_bins − 1)``, the
  convention of docs/design.md and of Guo et al. 2017). The two agree whenever no confidence is
  exactly 1.0 (probabilities that saturate in fp32, e.g. one-hot predictions, are where
  they differ).
* **Bin edges.** Here the bin is ``floor(fp32(conf · n_bins))``; torchmetrics compares conf
  with fp32 ``linspace`` edges. For a confidence within an ulp or so of an edge the two can
  pick neighbouring bins.
* **Sums.** Exact integers here (split- and order-invariant, no overflow); fp32 sums there,
  so results agree to ~1e-6, not bit for bit.
* **Invalid rows.** With logits, rows holding a NaN or +inf, or fully masked (all −inf), are
  skipped here (as everywhere in mllmcal); torchmetrics would propagate NaN.
* ``norm="l2"`` is sqrt(Σ_b (n_b/N)·(acc_b − conf_b)²) in both (no debiasing).

Example:
    >>> import torch
    >>> from mllmcal.integrations.torchmetrics import CalibrationError
    >>> metric = CalibrationError(n_bins=10)
    >>> metric.update(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]))
    >>> round(float(metric.compute()), 4)
    0.4
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from .. import _contract as C
from ..calibration.functional import carry_, check_choice, check_norm
from ..calibration.state import MAX_ROWS_PER_UPDATE, CalibrationState
from ..ops import histogram_add_, token_stats

__all__ = ["CalibrationError"]

_FORMATS = ("auto", "probs", "logits")


class CalibrationError(Metric):
    """Top-label calibration error from a streaming histogram (a ``torchmetrics.Metric``).

    Args:
        n_bins: equal-width confidence bins on [0, 1].
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` (MCE).
        num_classes: optional; when given, ``preds.shape[1]`` is checked against it.
        ignore_index: target value whose rows are skipped (``None``: none).
        input_format: ``"auto"`` (torchmetrics' rule: preds are logits if any value lies
            outside [0, 1]; a host sync per update), ``"probs"`` or ``"logits"``.
        validate_args: check shapes, dtypes and target ranges.
        **kwargs: passed to ``torchmetrics.Metric`` (``sync_on_compute``, ...).

    ``update(preds, target)``: ``preds`` float ``[N, C]`` probabilities or logits (any float
    dtype, any device), ``target`` integer ``[N]``. ``compute()`` returns a 0-dim fp32
    tensor on the metric's device. States: ``hist`` and ``hist_hi`` (int64 ``[3, n_bins]``,
    the low and high 32-bit limbs of each sum; ``dist_reduce_fx="sum"``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    hist: torch.Tensor
    hist_hi: torch.Tensor

    def __init__(self, n_bins: int = 15, norm: str = "l1", num_classes: int | None = None,
                 ignore_index: int | None = None, input_format: str = "auto",
                 validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
        check_norm(norm)
        check_choice("input_format", input_format, _FORMATS)
        self.n_bins, self.norm = n_bins, norm
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.input_format, self.validate_args = input_format, validate_args
        for name in ("hist", "hist_hi"):
            self.add_state(name, torch.zeros(3, n_bins, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds`` ``[N, C]`` probabilities or logits, ``target`` ``[N]``."""
        if self.validate_args:
            if not (isinstance(preds, torch.Tensor) and preds.is_floating_point()):
                raise TypeError("preds must be a floating-point tensor [N, C]")
            if preds.dim() != 2:
                raise ValueError(f"preds must be [N, C], got shape {tuple(preds.shape)}")
            if self.num_classes is not None and preds.shape[1] != self.num_classes:
                raise ValueError(f"preds has {preds.shape[1]} classes, expected "
                                 f"num_classes={self.num_classes}")
            if target.shape != preds.shape[:1] or target.is_floating_point():
                raise ValueError(f"target must be an integer tensor [N] = [{preds.shape[0]}], "
                                 f"got {target.dtype} {tuple(target.shape)}")
        n = preds.shape[0]
        if n > MAX_ROWS_PER_UPDATE:
            raise ValueError(f"one update may add at most 2**30 rows, got {n}; split the batch")
        target = target.to(preds.device)
        keep = (torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None
                else target != self.ignore_index)
        fmt = self.input_format
        if fmt == "auto":
            fmt = "logits" if bool(((preds < 0) | (preds > 1)).any()) else "probs"
        if fmt == "logits":
            labels = torch.where(keep, target, C.IGNORE_INDEX).long()
            token_stats(preds, labels, histogram=self.hist, validate=self.validate_args)
        else:
            conf, pred = preds.max(dim=1)
            if self.validate_args and n and bool(((conf < 0) | (conf > 1) | conf.isnan()).any()):
                raise ValueError("probabilities must lie in [0, 1]")
            histogram_add_(self.hist, conf.float(), pred == target, keep)
        # Carry after every update, so ``hist`` < 2**32 between updates: a sum over ranks
        # (torchmetrics' sync) and the next update (< 2**30 rows of <= 2**32 units) cannot
        # wrap it. The carry saturates ``hist_hi`` (an overflow stays marked and raises at
        # compute); a few device ops, no host sync.
        carry_(self.hist, self.hist_hi)

    def state(self) -> CalibrationState:
        """The histogram as a :class:`mllmcal.CalibrationState` (for plots, other norms)."""
        return CalibrationState.from_histogram(self.hist, self.hist_hi)

    def compute(self) -> torch.Tensor:
        """The calibration error, a 0-dim fp32 tensor (``ValueError`` if nothing was added)."""
        return torch.tensor(self.state().ece(self.norm), dtype=torch.float32,
                            device=self.hist.device)
