"""mllmcal.calibration.conformal: split conformal sets (LAC, APS) and selective answering."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest
import torch

import mllmcal
from mllmcal.calibration import conformal as cf

# --------------------------------------------------------------------------- synthetic data


def exchangeable(n: int, rng: np.random.Generator, k_max: int = 5):
    """Items with 2..k_max options, probabilities drawn from a Dirichlet, labels drawn from
    those probabilities: the model's probabilities are the true ones. Padded with -inf."""
    n_opt = rng.integers(2, k_max + 1, size=n)
    exists = np.arange(k_max)[None, :] < n_opt[:, None]
    g = np.where(exists, rng.gamma(1.0, size=(n, k_max)), 0.0)  # flat Dirichlet per item
    p = g / g.sum(1, keepdims=True)
    # label by inverse CDF; capped at the last option against float round-off
    labels = np.minimum((rng.random((n, 1)) > p.cumsum(1)).sum(1), n_opt - 1)
    return np.where(exists, p, -np.inf), labels, n_opt


def coverage(cp: cf.SplitConformal, probs, labels) -> float:
    sets = cp.predict_sets(probs)
    return float(sets[torch.arange(len(labels)), torch.as_tensor(labels)].double().mean())


# --------------------------------------------------------------------------- coverage guarantee


@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", True)])
def test_coverage_is_k_over_n_plus_1_on_average_across_seeds(score, randomized):
    # Continuous scores, no forced top option: P(y in set) = k/(n+1) exactly, k =
    # ceil((n+1)(1-alpha)), which lies in [1-alpha, 1-alpha+1/(n+1)]. The per-seed coverage
    # is Beta(k, n+1-k) given the calib draw plus binomial noise on the test draw; the
    # acceptance window is 4 standard errors of the mean over seeds, narrower than the gap
    # to the two wrong quantiles (no (n+1) correction; numpy 'higher' at k/n).
    n, m, alpha, seeds = 50, 400, 0.1, 300
    k = math.ceil((n + 1) * (1 - alpha))
    expect = k / (n + 1)
    var_seed = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)) + expect * (1 - expect) / m
    tol = 4 * math.sqrt(var_seed / seeds)
    wrong = (math.ceil(n * (1 - alpha)) / (n + 1), (k + 1) / (n + 1))
    assert all(abs(w - expect) > tol for w in wrong), "the test could not tell the quantiles apart"
    assert 1 - alpha <= expect <= 1 - alpha + 1 / (n + 1)

    covs = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        cal_p, cal_y, _ = exchangeable(n, rng)
        test_p, test_y, _ = exchangeable(m, rng)
        cp = cf.SplitConformal(score, alpha, randomized=randomized, nonempty=False, seed=seed)
        covs.append(coverage(cp.fit(cal_p, cal_y), test_p, test_y))
    mean = float(np.mean(covs))
    assert abs(mean - expect) <= tol, (mean, expect, tol)
    assert 1 - alpha - tol <= mean <= 1 - alpha + 1 / (n + 1) + tol


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_coverage_at_least_one_minus_alpha_with_default_sets(score):
    # non-randomised APS has ties (the least probable option scores 1) and the default
    # adds the top option to empty sets: only the lower bound holds
    n, m, alpha, seeds = 40, 300, 0.2, 100
    covs = []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        cal_p, cal_y, _ = exchangeable(n, rng)
        test_p, test_y, _ = exchangeable(m, rng)
        covs.append(coverage(cf.SplitConformal(score, alpha).fit(cal_p, cal_y), test_p, test_y))
    k = math.ceil((n + 1) * (1 - alpha))
    sd = math.sqrt(k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)) + 0.25 / m)
    assert np.mean(covs) >= 1 - alpha - 4 * sd / math.sqrt(seeds)


def test_quantile_is_the_kth_smallest_with_exact_rounding():
    s = torch.arange(99, dtype=torch.float64)  # scores 0..98, the j-th smallest is j-1
    # n = 9, alpha = 0.7: (n+1)(1-alpha) = 3 (3.0000000000000004 in floats), k = 3;
    # alpha = 0.3: k = 7 (the binary value of 0.3, just under 0.3, would give 8)
    assert cf.conformal_quantile(s[:9], 0.7) == 2.0
    assert cf.conformal_quantile(s[:9], 0.3) == 6.0
    assert cf.conformal_quantile(s, 0.1) == 89.0  # k = ceil(90) = 90
    assert cf.conformal_quantile(s.flip(0), 0.5) == 49.0  # order of the input is irrelevant
    assert cf.conformal_quantile(s, 0.005) == math.inf  # k = 100 > n
    assert cf.conformal_quantile([0.3], 0.6) == 0.3  # n = 1: k = ceil(0.8) = 1
    assert cf.conformal_quantile([0.3], 0.4) == math.inf  # k = ceil(1.2) = 2 > n
    cp = cf.SplitConformal("aps", 0.001).fit([[0.5, 0.5], [0.9, 0.1]], [0, 1])
    assert cp.threshold == math.inf and cp.to_dict()["threshold"] is None
    assert cp.predict_sets([[0.99, 0.01, -math.inf]]).tolist() == [[True, True, False]]


# --------------------------------------------------------------------------- NumPy transcription


def np_scores(row: np.ndarray, score: str, u: float | None) -> np.ndarray:
    p = row / row.sum()
    if score == "lac":
        return 1.0 - p
    s = np.empty_like(p)
    for j, pj in enumerate(p):
        above, tied = p[p > pj].sum(), p[p == pj].sum()
        s[j] = above + tied if u is None else above + u * tied
    return s


def np_sets(cal, cal_y, test, alpha, score, nonempty, u_cal, u_test):
    """Plain transcription: rows are lists of each item's own options."""
    cal_s = [np_scores(np.array(r), score, None if u_cal is None else u_cal[i])[cal_y[i]]
             for i, r in enumerate(cal)]
    n = len(cal_s)
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    qhat = np.inf if k > n else np.sort(cal_s)[k - 1]
    out = []
    for i, r in enumerate(test):
        r = np.array(r)
        inset = np_scores(r, score, None if u_test is None else u_test[i]) <= qhat
        if nonempty and not inset.any():
            inset = r == r.max()
        out.append(list(inset))
    return out


def dyadic_rows(n: int, rng: np.random.Generator, scale: int):
    """Probabilities c/16 (sums exact in float64, so many exact ties), times 1/scale."""
    rows = []
    for k in rng.integers(2, 7, size=n):
        c = rng.multinomial(16, rng.dirichlet(np.full(k, 0.7)))
        rows.append(list(c / 16.0 / scale))
    return rows


@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", False), ("aps", True)])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.1, 0.37, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("n_calib", [1, 7, 60])
def test_sets_equal_numpy_transcription(score, randomized, alpha, n_calib):
    rng = np.random.default_rng(int(alpha * 1000) + n_calib)
    for trial, nonempty in enumerate((True, False)):
        scale = 1 if trial == 0 else 2  # the second trial's rows sum to 1/2: renormalised
        cal, test = dyadic_rows(n_calib, rng, scale), dyadic_rows(80, rng, scale)
        cal_y = [int(rng.integers(len(r))) for r in cal]
        seed = 11 + trial
        u_cal = u_test = None
        if randomized:
            u_cal = torch.rand(n_calib, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64).numpy()
            u_test = torch.rand(len(test), generator=torch.Generator().manual_seed(seed + 1),
                                dtype=torch.float64).numpy()
        want = np_sets(cal, cal_y, test, alpha, score, nonempty, u_cal, u_test)
        # ragged lists for calib; the test rows padded, with n_options (NaN in the padding)
        width = 6
        padded = np.full((len(test), width), np.nan)
        for i, r in enumerate(test):
            padded[i, :len(r)] = r
        cp = cf.SplitConformal(score, alpha, randomized=randomized, nonempty=nonempty, seed=seed)
        got = cp.fit(cal, cal_y).predict_sets(torch.from_numpy(padded),
                                              n_options=[len(r) for r in test])
        assert got.shape == (len(test), width)
        for i, r in enumerate(test):
            assert got[i, :len(r)].tolist() == want[i], (i, r)
            assert not got[i, len(r):].any()


def test_aps_ties_enter_together_and_ignore_option_order():
    p = torch.tensor([[0.25, 0.5, 0.25], [0.25, 0.25, 0.5]], dtype=torch.float64)
    s = cf.conformal_scores(p, [0, 1], "aps")
    assert s.tolist() == [1.0, 1.0]  # both tied options carry the full mass, in either order
    s_top = cf.conformal_scores(p, [1, 2], "aps")
    assert s_top.tolist() == [0.5, 0.5]


# --------------------------------------------------------------------------- summary, inputs


def test_numpy_and_torch_inputs_agree_and_summary_is_plain_json():
    rng = np.random.default_rng(3)
    cal_p, cal_y, cal_k = exchangeable(30, rng)
    test_p, test_y, test_k = exchangeable(20, rng)
    correct = test_p.argmax(1) == test_y
    a = cf.conformal_summary(cal_p, cal_y, test_p, test_y, correct, alpha=0.2,
                             groups={"category": ["x", "y"] * 10})
    b = cf.conformal_summary(torch.from_numpy(cal_p).float(), torch.from_numpy(cal_y),
                             torch.from_numpy(np.where(np.isinf(test_p), 0.0, test_p)),
                             torch.from_numpy(test_y), torch.from_numpy(correct), alpha=0.2,
                             calib_n_options=cal_k, test_n_options=torch.from_numpy(test_k),
                             groups={"category": ["x", "y"] * 10})
    for score in ("lac", "aps"):
        assert a[score]["mean_set_size"] == pytest.approx(b[score]["mean_set_size"])
        assert a[score]["coverage"] == pytest.approx(b[score]["coverage"])
    assert json.loads(json.dumps(a)) == a
    assert set(a["lac"]["by"]["category"]) == {"x", "y"}
    assert a["lac"]["by"]["category"]["x"]["n"] == 10
    assert a["n_calib"] == 30 and a["n_test"] == 20 and a["alpha"] == 0.2


def test_ragged_rows_equal_padded_rows():
    rows = [np.array([0.5, 0.5]), torch.tensor([0.25, 0.25, 0.5]), [0.75, 0.125, 0.125]]
    padded = [[0.5, 0.5, -math.inf], [0.25, 0.25, 0.5], [0.75, 0.125, 0.125]]
    for score in cf.SCORES:
        a = cf.SplitConformal(score, 0.4).fit(rows, [0, 2, 1]).predict_sets(rows)
        b = cf.SplitConformal(score, 0.4).fit(padded, [0, 2, 1]).predict_sets(padded)
        assert torch.equal(a, b)


def test_uacc_is_accuracy_over_mean_set_size_times_sqrt_option_count():
    sets = torch.tensor([[True, True, False, False], [True, False, False, False]])
    out = cf.prediction_set_summary(sets, [1, 2], [True, False], 4)
    assert out["coverage"] == 0.5 and out["mean_set_size"] == 1.5 and out["accuracy"] == 0.5
    assert out["uacc"] == pytest.approx(0.5 / 1.5 * 2.0)
    mixed = cf.prediction_set_summary(sets, [1, 0], [True, True], [4, 2])
    assert mixed["uacc"] == pytest.approx(1.0 / 1.5 * math.sqrt(3.0))


def test_unnormalised_rows_are_renormalised():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]], dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    for score in cf.SCORES:
        a = cf.SplitConformal(score, 0.3).fit(p, y).predict_sets(p)
        b = cf.SplitConformal(score, 0.3).fit(p * 0.5, y).predict_sets(p * 4)  # exact scalings
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize("kwargs,match", [
    ({"probs": [[0.5, float("nan")], [0.5, 0.5]]}, "NaN at item 0, option 1"),
    ({"probs": [[0.5, -0.1], [0.5, 0.5]]}, "negative probability at item 0"),
    ({"probs": [[0.5, float("inf")], [0.5, 0.5]]}, "infinite probability"),
    ({"probs": [[0.0, 0.0], [0.5, 0.5]]}, "item 0: its options' probabilities sum to 0"),
    ({"probs": [[1.0], [1.0]]}, "K = 1"),
    ({"probs": [[0.5, 0.5, 0.0], [1.0, -math.inf, -math.inf]]}, "item 1 has 1 option"),
    ({"probs": [[0.5, 0.5]] * 2, "n_options": [2, 1]}, "item 1 has 1 option"),
    ({"probs": [[0.5, 0.5]] * 2, "n_options": [2, 3]}, "K = 2"),
    ({"probs": [[0.5, 0.5]] * 2, "n_options": [2, 2], "mask": [[1, 1]] * 2}, "not both"),
    ({"probs": [0.5, 0.5]}, r"\[n, K\]"),
])
def test_hostile_probabilities_raise_value_error(kwargs, match):
    probs = kwargs.pop("probs")
    with pytest.raises(ValueError, match=match):
        cf.SplitConformal("lac").fit(probs, [0, 0], **kwargs)


def test_nan_in_declared_padding_is_padding():
    p = [[0.5, 0.5, float("nan")], [0.2, 0.3, 0.5]]
    sets = cf.SplitConformal("aps", 0.5).fit(p, [0, 2], n_options=[2, 3]).predict_sets(
        p, n_options=[2, 3])
    assert not sets[0, 2]


def test_no_calibration_items_and_bad_alpha_or_labels_raise():
    for empty in ([], np.zeros((0, 4)), torch.zeros(0, 4)):
        with pytest.raises(ValueError, match="n_calib = 0"):
            cf.SplitConformal("lac").fit(empty, [])
    with pytest.raises(ValueError, match="n_calib = 0"):
        cf.conformal_quantile([], 0.1)
    for alpha in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            cf.SplitConformal("lac", alpha)
    with pytest.raises(ValueError, match="label 2 is not one of its options"):
        cf.SplitConformal("lac").fit([[0.5, 0.5, -math.inf]], [2])
    with pytest.raises(ValueError, match="score must be one of"):
        cf.SplitConformal("raps")
    with pytest.raises(RuntimeError, match="fit"):
        cf.SplitConformal("lac").predict_sets([[0.5, 0.5]])


# --------------------------------------------------------------------------- selective answering


def brute_force(conf, correct, target):
    """Every threshold among the confidences: the feasible one with the largest coverage."""
    best = (math.inf, 0.0)
    for t in sorted(set(c for c in conf if not math.isnan(c))):
        take = [i for i, c in enumerate(conf) if c >= t]
        risk = sum(not correct[i] for i in take) / len(take)
        if risk <= target and len(take) / len(conf) > best[1]:
            best = (t, len(take) / len(conf))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_selective_threshold_is_feasible_with_largest_coverage(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    conf = rng.choice([0.2, 0.4, 0.5, 0.6, 0.8, 0.9, float("nan")], size=n)  # ties, no-answers
    correct = (rng.random(n) < np.nan_to_num(conf, nan=0.0)) & ~np.isnan(conf)
    target = float(rng.choice([0.0, 0.05, 0.1, 0.25, 0.5]))
    pt = cf.selective_threshold(conf, correct, target)
    t, cov = brute_force(list(conf), list(correct), target)
    assert (pt.threshold, pt.coverage) == (t, cov)
    if pt.n_answered:
        assert pt.risk <= target
        at = cf.selective_at(conf, correct, pt.threshold)
        assert (at.coverage, at.risk) == (pt.coverage, pt.risk)


def test_selective_point_lies_on_the_risk_coverage_curve():
    rng = np.random.default_rng(5)
    conf = torch.from_numpy(rng.choice([0.3, 0.5, 0.7, 0.9], size=200))
    correct = torch.from_numpy(rng.random(200) < conf.numpy())
    pt = cf.selective_threshold(conf, correct, 0.2)
    cov, risk = mllmcal.metrics.risk_coverage_curve(conf, correct)
    assert pt.n_answered > 0
    assert float(cov[pt.n_answered - 1]) == pytest.approx(pt.coverage)
    assert float(risk[pt.n_answered - 1]) == pytest.approx(pt.risk)


def test_selective_degenerate_cases():
    all_right = cf.selective_threshold([0.9, 0.3, 0.6], [True, True, True], 0.1)
    assert (all_right.threshold, all_right.coverage, all_right.risk) == (0.3, 1.0, 0.0)
    none_right = cf.selective_threshold([0.9, 0.3, 0.6], [False] * 3, 0.1)
    assert (none_right.threshold, none_right.coverage, none_right.risk) == (math.inf, 0.0, None)
    assert none_right.to_dict()["threshold"] is None
    assert cf.selective_threshold([0.9, 0.3], [False, False], 1.0).coverage == 1.0
    no_answers = cf.selective_threshold([float("nan")] * 2, [False, False], 0.5)
    assert no_answers.coverage == 0.0 and no_answers.n == 2
    for empty in ([], np.zeros(0), torch.zeros(0)):
        with pytest.raises(ValueError, match="no items"):
            cf.selective_threshold(empty, [], 0.1)
    with pytest.raises(ValueError, match="target_risk"):
        cf.selective_threshold([0.5], [True], 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cf.selective_threshold([1.5], [True], 0.1)


def test_selective_answering_fits_on_calib_and_measures_test():
    out = cf.selective_answering([0.9, 0.8, 0.7, 0.6], [True, True, False, True],
                                 torch.tensor([0.95, 0.85, 0.5]), torch.tensor([True, False, True]),
                                 target_risk=0.1)
    assert out["threshold"] == 0.8
    assert out["calib"] == {"coverage": 0.5, "risk": 0.0, "n": 4, "n_answered": 2}
    assert out["test"] == {"coverage": pytest.approx(2 / 3), "risk": 0.5, "n": 3, "n_answered": 2}
    assert json.loads(json.dumps(out)) == out


def test_risk_coverage_plot_marks_the_selective_point(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    c = torch.rand(500, generator=g)
    y = torch.rand(500, generator=g) < c
    pt = cf.selective_threshold(c, y, 0.1)
    plain = mllmcal.plot.risk_coverage_plot(c, y, tmp_path / "rc.png")
    marked = mllmcal.plot.risk_coverage_plot(c, y, tmp_path / "rc_mark.png",
                                             mark=(pt.coverage, pt.risk))
    with Image.open(plain) as a, Image.open(marked) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes()


def test_docstring_examples_run():
    result = doctest.testmod(cf, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
