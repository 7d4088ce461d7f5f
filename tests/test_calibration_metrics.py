"""mllmcal.metrics: every estimator against a float64 definition written here."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mllmcal
from mllmcal import metrics as M
from mllmcal import reference as R
from mllmcal.reference import make_labels, make_logits


def pairs(n, seed, power=1.5, dtype=torch.float32, levels=None):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=g, dtype=torch.float64)
    if levels:  # few distinct values: lots of ties
        c = torch.floor(c * levels) / levels
    y = torch.rand(n, generator=g, dtype=torch.float64) < c**power
    return c.to(dtype), y


# --------------------------------------------------------------------------- definitions


def bins_f64(c, y, n_bins, binning):
    c64 = c.double().numpy()
    n = len(c64)
    if binning == "uniform":
        prod = (c.float() * n_bins).double().numpy() if c.dtype != torch.float64 else c64 * n_bins
        return np.minimum(np.floor(prod).astype(int), n_bins - 1)
    order = np.lexsort((y.numpy().astype(int), c.double().numpy()))  # by conf, then correct
    b = np.empty(n, dtype=int)
    b[order] = (np.arange(n) * n_bins) // n
    return b


def ece_def(c, y, n_bins, norm, binning):
    b = bins_f64(c, y, n_bins, binning)
    c64, y64 = c.double().numpy(), y.double().numpy()
    gaps, ws = [], []
    for k in range(n_bins):
        m = b == k
        if m.any():
            gaps.append(abs(y64[m].mean() - c64[m].mean()))
            ws.append(m.mean())
    gaps, ws = np.array(gaps), np.array(ws)
    return {"l1": (ws * gaps).sum(), "l2": math.sqrt((ws * gaps**2).sum()), "max": gaps.max()}[norm]


def debiased_def(c, y, n_bins, binning):
    b = bins_f64(c, y, n_bins, binning)
    c64, y64 = c.double().numpy(), y.double().numpy()
    total = 0.0
    for k in range(n_bins):
        m = b == k
        nk = m.sum()
        if nk >= 2:
            acc = y64[m].mean()
            total += nk / len(c64) * ((c64[m].mean() - acc) ** 2 - acc * (1 - acc) / (nk - 1))
    return total


def smece_sigma_def(c, y, sigma, t):
    """∫ |(1/n) Σ K_σ(t, f_i) (y_i − f_i)| dt with the reflected Gaussian, exact kernel."""
    f = c.double().numpy()[None, :]
    r = (y.double().numpy() - c.double().numpy())[None, :]
    tt = t[:, None]
    k = np.zeros((len(t), f.shape[1]))
    for j in range(-2, 3):  # farther images add < 1e-5 relative for σ <= 1
        k += np.exp(-0.5 * ((tt - f + 2 * j) / sigma) ** 2) + np.exp(-0.5 * ((tt + f + 2 * j) / sigma) ** 2)
    k /= sigma * math.sqrt(2 * math.pi)
    h = np.abs((k * r).mean(1))
    return float(np.sum((h[1:] + h[:-1]) / 2 * np.diff(t)))


def smece_def(c, y, eps=1e-3):
    t = np.linspace(0, 1, 2001)
    lo, hi = eps, 1.0
    if smece_sigma_def(c, y, lo, t) <= lo:
        return smece_sigma_def(c, y, lo, t), lo
    for _ in range(20):
        mid = (lo + hi) / 2
        if smece_sigma_def(c, y, mid, t) > mid:
            lo = mid
        else:
            hi = mid
    s = (lo + hi) / 2
    return smece_sigma_def(c, y, s, t), s


# --------------------------------------------------------------------------- binned ECE


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ece_matches_float64_definition(binning, norm, dtype):
    c, y = pairs(2000, seed=7, dtype=dtype)
    for n_bins in (1, 10, 15, 37):
        assert M.ece(c, y, n_bins, norm, binning) == pytest.approx(
            ece_def(c, y, n_bins, norm, binning), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 10**6), n_bins=st.integers(1, 30),
       levels=st.sampled_from([None, 3, 10]), binning=st.sampled_from(["uniform", "quantile"]))
def test_ece_property_random_inputs_with_ties(n, seed, n_bins, levels, binning):
    c, y = pairs(n, seed, levels=levels)
    assert M.ece(c, y, n_bins, "l1", binning) == pytest.approx(
        ece_def(c, y, n_bins, "l1", binning), abs=1e-12)
    # Equal-mass bins depend on the multiset of pairs, not their order.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert M.ece(c[perm], y[perm], n_bins, "l2", binning) == pytest.approx(
        M.ece(c, y, n_bins, "l2", binning), abs=1e-12)


def test_ece_of_state_equals_ece_of_pairs():
    c, y = pairs(5000, 3)
    s = mllmcal.CalibrationState(15)
    s.update(c, y)
    for norm in ("l1", "l2", "max"):
        assert M.ece(s, norm=norm) == pytest.approx(M.ece(c, y, 15, norm), abs=1e-9)


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
def test_debiased_l2_matches_definition(binning):
    c, y = pairs(3000, 11, power=2.0)
    for n_bins in (1, 5, 15, 60):
        sq = debiased_def(c, y, n_bins, binning)
        assert M.debiased_l2_ece(c, y, n_bins, binning, squared=True) == pytest.approx(sq, abs=1e-12)
        assert M.debiased_l2_ece(c, y, n_bins, binning) == pytest.approx(math.sqrt(max(sq, 0)), abs=1e-12)
    s = mllmcal.CalibrationState(15)
    s.update(c, y)
    assert M.debiased_l2_ece(s, squared=True) == pytest.approx(debiased_def(c, y, 15, "uniform"), abs=1e-9)


def test_debiased_l2_is_less_biased_than_plugin_on_calibrated_data():
    # Perfectly calibrated population: the true L2 error is 0. The plug-in estimate is
    # biased upwards by bin noise; the debiased one is centred near 0.
    plug, deb = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        c = torch.rand(400, generator=g, dtype=torch.float64)
        y = torch.rand(400, generator=g, dtype=torch.float64) < c
        plug.append(M.ece(c, y, 15, "l2", "quantile") ** 2)
        deb.append(M.debiased_l2_ece(c, y, 15, "quantile", squared=True))
    assert abs(np.mean(deb)) < 0.25 * np.mean(plug)


# --------------------------------------------------------------------------- smooth ECE


@pytest.mark.parametrize("seed,power", [(0, 1.0), (1, 2.0)])
def test_smooth_ece_matches_definition_and_bandwidth_is_a_fixed_point(seed, power):
    c, y = pairs(300, seed, power=power, dtype=torch.float64)
    ref, ref_sigma = smece_def(c, y)
    got, sigma = M.smooth_ece(c, y, return_sigma=True)
    # Only discretisation differs (grid deposit vs exact kernel at each sample).
    assert got == pytest.approx(ref, abs=1e-4)
    assert sigma == pytest.approx(ref_sigma, abs=1e-4)
    if sigma > 1e-3:
        assert got == pytest.approx(sigma, abs=1e-4)  # smECE_σ* = σ*


def test_smooth_ece_streams_from_a_fine_state():
    c, y = pairs(20000, 5, power=1.8)
    s = mllmcal.CalibrationState(1000)
    for chunk in range(4):
        sl = slice(chunk * 5000, (chunk + 1) * 5000)
        s.update(c[sl], y[sl])
    assert M.smooth_ece(s) == pytest.approx(M.smooth_ece(c, y), abs=1e-3)


# --------------------------------------------------------------------------- scores


def test_brier_nll_accuracy_match_definitions():
    c, y = pairs(777, 9)
    assert M.brier_score(c, y) == pytest.approx(float(((c.double() - y.double()) ** 2).mean()), abs=1e-15)
    assert M.accuracy(y) == pytest.approx(float(y.double().mean()))
    x = make_logits(100, 64, torch.float32, "masked", seed=3)
    lab = make_labels(100, 64, seed=3)
    ref = R.token_stats(x, lab, 1.4)
    keep = ref.valid & (lab != -100)
    assert M.nll(x, lab, 1.4) == pytest.approx(float(-ref.label_logprob[keep].mean()), rel=1e-5)
    assert M.multiclass_brier_score(x, lab, 1.4) == pytest.approx(float(ref.brier[keep].mean()), rel=1e-5)


def auroc_def(c, y):
    c64 = c.double().numpy()
    pos, neg = c64[y.numpy()], c64[~y.numpy()]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 150), seed=st.integers(0, 10**6), levels=st.sampled_from([None, 2, 7]))
def test_auroc_matches_pairwise_definition(n, seed, levels):
    c, y = pairs(n, seed, levels=levels)
    if y.all() or not y.any():
        with pytest.raises(ValueError, match="both correct and incorrect"):
            M.auroc(c, y)
    else:
        assert M.auroc(c, y) == pytest.approx(auroc_def(c, y), abs=1e-12)


def aurc_by_enumerating_tie_orders(c, y):
    """Mean over every order of tied samples of (1/n) Σ_k risk of the top-k samples."""
    c64, err = c.double().numpy(), 1 - y.double().numpy()
    groups = [np.flatnonzero(c64 == v) for v in sorted(set(c64.tolist()), reverse=True)]
    vals = []
    for orders in itertools.product(*[list(itertools.permutations(g)) for g in groups]):
        seq = np.concatenate([np.array(o) for o in orders])
        risk = np.cumsum(err[seq]) / np.arange(1, len(seq) + 1)
        vals.append(risk.mean())
    return float(np.mean(vals))


def test_risk_coverage_and_aurc_match_definition_with_ties():
    g = torch.Generator().manual_seed(2)
    c = torch.tensor([0.9, 0.9, 0.7, 0.7, 0.7, 0.2, 0.95], dtype=torch.float64)
    y = torch.tensor([True, False, True, False, False, True, True])
    assert M.aurc(c, y) == pytest.approx(aurc_by_enumerating_tie_orders(c, y), abs=1e-12)
    cov, risk = M.risk_coverage_curve(c, y)
    assert torch.allclose(cov, torch.arange(1, 8, dtype=torch.float64) / 7)
    assert risk[0] == 0.0 and risk[-1] == pytest.approx(3 / 7)
    # Without ties the curve is the plain cumulative error rate of the sorted samples.
    c2 = torch.rand(300, generator=g, dtype=torch.float64)
    y2 = torch.rand(300, generator=g, dtype=torch.float64) < c2
    order = torch.argsort(c2, descending=True)
    exp = torch.cumsum(1 - y2[order].double(), 0) / torch.arange(1, 301)
    assert torch.allclose(M.risk_coverage_curve(c2, y2)[1], exp, atol=1e-14)
    assert M.aurc(c2, y2) == pytest.approx(float(exp.mean()), abs=1e-14)


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
def test_bootstrap_ci_matches_resampled_definition(binning):
    c, y = pairs(150, 21)
    n_boot = 120
    ci = M.ece_bootstrap_ci(c, y, n_bins=10, binning=binning, n_boot=n_boot, alpha=0.1, seed=5)
    idx = torch.randint(0, 150, (n_boot, 150), generator=torch.Generator().manual_seed(5))
    reps = [ece_def(c[i], y[i], 10, "l1", binning) for i in idx]
    lo, hi = np.quantile(reps, [0.05, 0.95])
    assert ci.estimate == pytest.approx(ece_def(c, y, 10, "l1", binning), abs=1e-12)
    assert ci.low == pytest.approx(lo, abs=1e-12) and ci.high == pytest.approx(hi, abs=1e-12)
    assert ci.low <= ci.high


def test_bootstrap_ci_chunked_draws_match_one_draw():
    # n large enough that the replicates are drawn and evaluated in several chunks.
    c, y = pairs(30_000, 4)
    ci = M.ece_bootstrap_ci(c, y, n_bins=15, n_boot=150, alpha=0.2, seed=1)
    idx = torch.randint(0, 30_000, (150, 30_000), generator=torch.Generator().manual_seed(1))
    reps = [M.ece(c[i], y[i], 15) for i in idx]
    lo, hi = np.quantile(reps, [0.1, 0.9])
    assert ci.low == pytest.approx(lo, abs=1e-12) and ci.high == pytest.approx(hi, abs=1e-12)


def test_metric_bad_input_errors():
    with pytest.raises(ValueError, match="same number of elements"):
        M.ece(torch.rand(5), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.ece(torch.tensor([-0.1, 0.5]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        M.ece(torch.rand(5), torch.ones(5, dtype=torch.bool), n_bins=0)
    with pytest.raises(ValueError, match="no data"):
        M.ece(torch.empty(0), torch.empty(0, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm"):
        M.ece(torch.rand(5), torch.ones(5, dtype=torch.bool), norm="l3")
    with pytest.raises(ValueError, match="binning"):
        M.ece(torch.rand(5), torch.ones(5, dtype=torch.bool), binning="adaptive")
