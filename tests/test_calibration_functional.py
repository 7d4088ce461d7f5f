"""mllmcal.calibration.functional: the one home of binning, ECE from bins and the limb carry;
every caller (state, metrics, recalibration, torchmetrics) agrees with it."""

from __future__ import annotations

import pytest
import torch

import mllmcal
from mllmcal import _contract as C
from mllmcal.calibration import functional as F
from mllmcal.calibration.recalibration import HistogramBinning


def _pairs(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=g)
    return c, torch.rand(n, generator=g) < c


@pytest.mark.parametrize("n_bins", [1, 7, 10, 15, 100])
def test_bin_index_is_the_kernels_rule_for_fp32_and_keeps_float64_products(n_bins):
    c = torch.cat((torch.rand(4000, generator=torch.Generator().manual_seed(1)),
                   torch.arange(n_bins + 1) / n_bins))  # every edge, 0 and 1 included
    assert torch.equal(F.bin_index(c, n_bins), C.conf_bins(c, n_bins))
    assert torch.equal(F.bin_index(c.half(), n_bins), C.conf_bins(c.half(), n_bins))
    c64 = c.double()
    assert torch.equal(F.bin_index(c64, n_bins),
                       torch.floor(c64 * n_bins).long().clamp(0, n_bins - 1))
    assert int(F.bin_index(torch.tensor([1.0]), n_bins)) == n_bins - 1


def test_quantile_bins_have_sizes_within_one_and_ignore_input_order():
    c, y = _pairs(1001)
    b = F.quantile_bin_index(c, y.double(), 10)
    sizes = torch.bincount(b, minlength=10)
    assert int(sizes.max() - sizes.min()) <= 1
    perm = torch.randperm(c.numel(), generator=torch.Generator().manual_seed(2))
    b2 = F.quantile_bin_index(c[perm], y.double()[perm], 10)
    assert torch.equal(torch.bincount(b2, minlength=10), sizes)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_state_and_metrics_ece_are_ece_from_bins(norm):
    c, y = _pairs()
    s = mllmcal.CalibrationState(15)
    s.update(c, y)
    assert s.ece(norm) == F.ece_from_bins(*s.bin_sums(), norm)
    cd, yd = c.double(), y.double()
    sums = F.bin_sums(cd, yd, F.bin_index(c, 15), 15)
    assert mllmcal.metrics.ece(c, y, 15, norm) == F.ece_from_bins(*sums, norm)
    # The state's sums are the pairs' sums up to the 2**-33 rounding of each confidence.
    assert s.ece(norm) == pytest.approx(F.ece_from_bins(*sums, norm), abs=1e-9)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_batched_ece_matches_one_histogram_at_a_time(norm):
    rows = []
    for seed in range(5):
        c, y = _pairs(500, seed)
        rows.append(F.bin_sums(c.double(), y.double(), F.bin_index(c, 12), 12))
    cnt, sc, sy = (torch.stack(t) for t in zip(*rows, strict=True))
    batched = F.ece_from_bins_batched(cnt, sc, sy, 500, norm)
    for i, r in enumerate(rows):
        assert float(batched[i]) == pytest.approx(F.ece_from_bins(*r, norm), rel=1e-12)


def test_histogram_binning_bins_like_bin_index():
    c, y = _pairs()
    hb = HistogramBinning(10).fit(c, y)
    assert torch.equal(hb.transform(c), hb.values[F.bin_index(c, 10)])


def test_carry_moves_high_bits_and_saturates():
    lo = torch.tensor([5, (3 << 32) + 7, (1 << 40)], dtype=torch.int64)
    hi = torch.tensor([0, 2, F.HI_LIMIT], dtype=torch.int64)
    F.carry_(lo, hi)
    assert lo.tolist() == [5, 7, 0]
    assert hi.tolist() == [0, 5, F.HI_LIMIT + 1]  # saturated: the sticky overflow mark
    F.carry_(lo.fill_(1 << 33), hi)
    assert hi.tolist() == [2, 7, F.HI_LIMIT + 1]


def test_checks_name_the_bad_argument():
    with pytest.raises(TypeError, match="n_bins must be an int"):
        F.check_n_bins(True)
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        F.check_n_bins(0)
    with pytest.raises(ValueError, match="norm must be one of"):
        F.check_norm("l3")
    with pytest.raises(ValueError, match="binning must be one of"):
        F.check_binning("equal")
