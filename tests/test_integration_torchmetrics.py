"""mllmcal.integrations.torchmetrics.CalibrationError against torchmetrics'
MulticlassCalibrationError, where the binning conventions agree and where they differ."""

from __future__ import annotations

import pytest
import torch

import mllmcal
from mllmcal.reference import make_logits

torchmetrics = pytest.importorskip("torchmetrics")
from torchmetrics.classification import MulticlassCalibrationError  # noqa: E402

from mllmcal.integrations.torchmetrics import CalibrationError  # noqa: E402


def probs_and_target(n, c, seed, n_bins=None):
    """Random probabilities [n, C] (peaky, like a softmax) and targets. With ``n_bins``, rows
    whose confidence lies where the two binning rules could disagree (1.0, or within 1e-5
    of a bin edge in units of the bin width) are dropped."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2.5 * torch.randn(n, c, generator=g, dtype=torch.float64), 1)
    target = torch.multinomial(p ** 1.3, 1, generator=g).squeeze(1)
    p = p.float()
    if n_bins is not None:
        keep = _edge_safe_rows(p.max(1).values, n_bins)
        p, target = p[keep], target[keep]
    return p, target


def _edge_safe_rows(conf, n_bins):
    scaled = conf.double() * n_bins
    return ((scaled - scaled.round()).abs() > 1e-5) & (conf < 1)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [5, 15, 40])
def test_matches_multiclass_calibration_error_on_probabilities(norm, n_bins):
    ours = CalibrationError(n_bins=n_bins, norm=norm)
    ref = MulticlassCalibrationError(num_classes=11, n_bins=n_bins, norm=norm)
    for seed in range(4):
        p, t = probs_and_target(700, 11, seed, n_bins)
        assert p.shape[0] > 650
        ours.update(p, t)
        ref.update(p, t)
    assert float(ours.compute()) == pytest.approx(float(ref.compute()), abs=2e-6)


def test_matches_on_logits_with_ignore_index_and_fused_path():
    x = make_logits(900, 37, torch.float32, "normal", seed=3)
    x = x[_edge_safe_rows(torch.softmax(x, 1).max(1).values, 15)]
    t = torch.randint(0, 37, (x.shape[0],), generator=torch.Generator().manual_seed(3))
    t[::9] = 5  # ignored class index
    ours = CalibrationError(n_bins=15, ignore_index=5)
    ref = MulticlassCalibrationError(num_classes=37, n_bins=15, ignore_index=5)
    ours.update(x, t)
    ref.update(x, t)
    assert float(ours.compute()) == pytest.approx(float(ref.compute()), abs=2e-6)
    # The fused path (logits through token_stats) bins exactly like CalibrationState.
    s = mllmcal.CalibrationState(15)
    s.update_logits(x, torch.where(t == 5, -100, t))
    d_ours, d_state = ours.state().to_dict(), s.to_dict()
    for key in ("count", "sum_confidence_fixed", "sum_correct"):
        assert d_ours[key] == d_state[key]


def test_confidence_exactly_one_is_where_the_conventions_differ():
    # Half the rows one-hot (conf 1.0, right), half at conf 0.95 (wrong), n_bins = 10.
    p = torch.zeros(200, 3)
    p[:100, 0] = 1.0
    p[100:, 0], p[100:, 1], p[100:, 2] = 0.95, 0.03, 0.02
    t = torch.zeros(200, dtype=torch.long)
    t[100:] = 1
    ours, ref = CalibrationError(n_bins=10), MulticlassCalibrationError(num_classes=3, n_bins=10)
    ours.update(p, t)
    ref.update(p, t)
    # mllmcal: one last bin with conf 0.975 and accuracy 0.5, ECE 0.475; torchmetrics: 1.0 in
    # its own extra bin (gap 0) and 0.95 in bin 9 (gap 0.95), ECE 0.475 as well here, so
    # compare MCE, which tells the two apart.
    assert float(ours.compute()) == pytest.approx(0.475, abs=1e-6)
    mce_ours = CalibrationError(n_bins=10, norm="max")
    mce_ref = MulticlassCalibrationError(num_classes=3, n_bins=10, norm="max")
    mce_ours.update(p, t)
    mce_ref.update(p, t)
    assert float(mce_ours.compute()) == pytest.approx(0.475, abs=1e-6)
    assert float(mce_ref.compute()) == pytest.approx(0.95, abs=1e-6)


def test_memory_is_o_n_bins_merge_state_and_reset():
    m = CalibrationError(n_bins=12)
    shapes = {k: tuple(v.shape) for k, v in m.metric_state.items()}
    whole = CalibrationError(n_bins=12)
    parts = [CalibrationError(n_bins=12) for _ in range(3)]
    for seed in range(9):
        p, t = probs_and_target(300, 7, seed)
        whole.update(p, t)
        parts[seed % 3].update(p, t)
        m.update(p, t)
    assert {k: tuple(v.shape) for k, v in m.metric_state.items()} == shapes == {
        "hist": (3, 12), "hist_hi": (3, 12)}
    parts[0].merge_state(parts[1])
    parts[0].merge_state(parts[2])
    assert parts[0].state().to_dict() == whole.state().to_dict()
    assert float(parts[0].compute()) == float(whole.compute())
    m.reset()
    with pytest.raises(ValueError, match="empty"), pytest.warns(UserWarning, match="before"):
        m.compute()


def test_sums_past_int64_stay_exact_through_the_high_limb():
    m = CalibrationError(n_bins=4)
    p, t = probs_and_target(50, 5, 0)
    m.update(p, t)
    base = m.state().to_dict()
    # Pretend 2**40 copies were synced in: scale both limbs (what a sum over ranks does).
    m.hist_hi.copy_((m.hist_hi << 40) + (m.hist << 8))
    m.hist.zero_()
    d = m.state().to_dict()
    assert d["count"] == [c << 40 for c in base["count"]]
    assert float(m.compute()) == pytest.approx(
        mllmcal.CalibrationState.from_dict(base).ece(), rel=1e-6)  # an fp32 result


def test_an_overflowed_metric_stays_marked_through_updates_and_syncs():
    from mllmcal.calibration.functional import HI_LIMIT

    m = CalibrationError(n_bins=4)
    p, t = probs_and_target(50, 5, 0)
    m.update(p, t)
    # A high limb at the state's limit (what a saturated sum leaves) ...
    m.hist_hi[0].fill_(HI_LIMIT + 1)
    m.hist[0].fill_((1 << 32) - 1)
    m.update(p, t)
    # ... is not pushed past it by the next update's carry: the carry saturates.
    assert int(m.hist_hi.max()) == HI_LIMIT + 1
    # Two ranks' saturated limbs summed by torchmetrics' sync wrap past 2**63; the state
    # still reads as overflowed instead of returning a number made of a negative sum.
    other = CalibrationError(n_bins=4)
    other.update(p, t)
    other.hist_hi[0].fill_(HI_LIMIT + 1)
    m.merge_state(other)
    assert int(m.hist_hi.min()) < 0
    with pytest.raises(OverflowError, match="count"):
        m.compute()


def test_bad_input_is_clear():
    with pytest.raises(ValueError, match="norm"):
        CalibrationError(norm="l3")
    m = CalibrationError(num_classes=4)
    with pytest.raises(ValueError, match="num_classes=4"):
        m.update(torch.rand(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        m.update(torch.rand(3), torch.zeros(3, dtype=torch.long))


def test_docstring_example_runs():
    import doctest

    from mllmcal.integrations import torchmetrics as mod

    res = doctest.testmod(mod)
    assert res.attempted > 0 and res.failed == 0
