"""Histogram binning and isotonic regression (PAV) against float64 definitions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mllmcal import metrics as M
from mllmcal.calibration import HistogramBinning, IsotonicRegression
from mllmcal.calibration.recalibration import pav


def overconfident_pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.rand(n, generator=g, dtype=torch.float64) < c**3  # true accuracy c³ < c
    return c, y


def isotonic_minmax(y, w):
    """Isotonic regression by its min-max formula:
    ŷ_i = max_{j <= i} min_{k >= i} (weighted mean of y_j..y_k)."""
    y, w = np.asarray(y, float), np.asarray(w, float)
    m = len(y)
    out = np.empty(m)
    for i in range(m):
        out[i] = max(
            min(np.dot(w[j : k + 1], y[j : k + 1]) / w[j : k + 1].sum() for k in range(i, m))
            for j in range(i + 1)
        )
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(0.1, 3)), min_size=1, max_size=25))
def test_pav_equals_minmax_definition(data):
    y = torch.tensor([d[0] for d in data], dtype=torch.float64)
    w = torch.tensor([d[1] for d in data], dtype=torch.float64)
    got = pav(y, w).numpy()
    np.testing.assert_allclose(got, isotonic_minmax(y, w), atol=1e-9)
    assert np.all(np.diff(got) >= -1e-12)


def test_isotonic_fit_on_pooled_ties_and_transform_interpolates():
    c = torch.tensor([0.1, 0.1, 0.3, 0.5, 0.5, 0.5, 0.9])
    y = torch.tensor([True, False, False, True, True, False, True])
    iso = IsotonicRegression().fit(c, y)
    xs = np.array([0.1, 0.3, 0.5, 0.9])
    fitted = isotonic_minmax([0.5, 0.0, 2 / 3, 1.0], [2, 1, 3, 1])
    np.testing.assert_allclose(iso.y.numpy(), fitted, atol=1e-12)
    q = torch.tensor([0.0, 0.1, 0.2, 0.7, 1.0])
    np.testing.assert_allclose(iso.transform(q).numpy(), np.interp(q.numpy(), xs, fitted), atol=1e-7)


def test_histogram_binning_maps_bins_to_their_accuracy():
    c, y = overconfident_pairs(5000, 1)
    hb = HistogramBinning(10).fit(c, y)
    b = np.minimum(np.floor(c.numpy() * 10).astype(int), 9)
    acc = np.array([y.numpy()[b == k].mean() for k in range(10)])
    q = torch.tensor([0.05, 0.15, 0.55, 0.99, 1.0], dtype=torch.float64)
    qb = np.minimum(np.floor(q.numpy() * 10).astype(int), 9)
    np.testing.assert_allclose(hb.transform(q).numpy(), acc[qb], atol=1e-12)


@pytest.mark.parametrize("make", [lambda: HistogramBinning(15), lambda: HistogramBinning(15, "quantile"),
                                  IsotonicRegression])
def test_recalibration_reduces_ece_on_held_out_data(make):
    c_fit, y_fit = overconfident_pairs(20000, 2)
    c_test, y_test = overconfident_pairs(20000, 3)
    cal = make().fit(c_fit, y_fit)
    out = cal.transform(c_test)
    assert out.shape == c_test.shape and bool(((out >= 0) & (out <= 1)).all())
    before = M.ece(c_test, y_test, 15)
    after = M.ece(out, y_test, 15)
    assert before > 0.1 and after < 0.3 * before


def test_quantile_histogram_binning_with_more_bins_than_samples():
    hb = HistogramBinning(10, "quantile").fit(torch.tensor([0.2, 0.8, 0.8]), torch.tensor([0, 1, 1]))
    out = hb.transform(torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0]))
    assert bool(((out >= 0) & (out <= 1)).all()) and out[3] == 1.0 and out[1] == 0.0


def test_recalibration_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        IsotonicRegression().transform(torch.rand(3))
    with pytest.raises(RuntimeError, match="not fitted"):
        HistogramBinning().transform(torch.rand(3))
    with pytest.raises(ValueError, match="no data"):
        IsotonicRegression().fit(torch.empty(0), torch.empty(0, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        HistogramBinning(0)
    with pytest.raises(ValueError, match="same number of elements"):
        HistogramBinning().fit(torch.rand(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        IsotonicRegression().fit(torch.tensor([0.2, 1.2]), torch.tensor([True, False]))
