"""Temperature fitting: recovery of a known temperature, agreement with a float64 grid
search, the paper's grid, streaming inputs, the online estimator, and bad input."""

import math

import pytest
import torch

import mllmcal
from mllmcal.calibration.temperature import PAPER_TEMPERATURE_GRID

T_TRUE = 2.0


def overconfident_data(n, v, seed, t_true=T_TRUE, scale=4.0):
    """Logits x from N(0, scale²); labels drawn from softmax(x / t_true). A model that
    reports softmax(x) is over-confident, and the NLL-optimal temperature is t_true."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(torch.softmax(x / t_true, -1), 1, generator=g).squeeze(1)
    return x.float(), y


def nll_f64(x, y, temps):
    """Σ_i −log softmax(x_i / T)_{y_i} in float64 for every T in ``temps``."""
    x = x.double()
    xy = x.gather(1, y[:, None]).squeeze(1)
    out = []
    for tk in temps.split(32):
        z = x[None] / tk[:, None, None]
        out.append((torch.logsumexp(z, -1) - xy[None] / tk[:, None]).sum(-1))
    return torch.cat(out)


def test_newton_recovers_known_temperature_and_agrees_with_fine_grid():
    x, y = overconfident_data(3000, 20, seed=0)
    t, info = mllmcal.fit_temperature(x, y, return_info=True)
    assert info["converged"] and info["passes"] <= 10
    # Tolerance from the sample: the MLE of β has s.e. 1/sqrt(Fisher) with Fisher =
    # Σ Var_p[x] at β; in T units s.e.(T) = T² s.e.(β). Allow 4 s.e.
    z = x.double() / t
    p = torch.softmax(z, -1)
    var = (p * x.double() ** 2).sum(-1) - (p * x.double()).sum(-1) ** 2
    se_t = t * t / math.sqrt(float(var.sum()))
    assert abs(t - T_TRUE) < 4 * se_t, (t, se_t)
    assert se_t < 0.1  # the check above is not vacuous
    # Fine grid (steps of 0.05% of T) on ±5% around the fit. The NLL is convex in β = 1/T,
    # so a minimum inside the window is the global one.
    temps = t * torch.linspace(0.95, 1.05, 201, dtype=torch.float64)
    k = int(torch.argmin(nll_f64(x, y, temps)))
    assert 0 < k < 200
    t_grid = float(temps[k])
    assert t == pytest.approx(t_grid, rel=5e-3)
    # Newton is at the optimum to far better than the grid spacing: the derivative vanishes.
    assert abs(info["grad"]) / info["n_rows"] < 1e-5


def test_streaming_batches_callable_and_reiterable_agree_with_tensor():
    x, y = overconfident_data(1200, 33, seed=1)
    t_tensor = mllmcal.fit_temperature(x, y)
    batches = [(x[i : i + 100].to(torch.bfloat16).float(), y[i : i + 100]) for i in range(0, 1200, 100)]
    # Same values as the bf16 round trip below, so the three inputs are the same data.
    x_rt = torch.cat([b[0] for b in batches])
    t_ref = mllmcal.fit_temperature(x_rt, y)
    assert mllmcal.fit_temperature(batches) == pytest.approx(t_ref, rel=1e-6)
    assert mllmcal.fit_temperature(lambda: iter(batches)) == pytest.approx(t_ref, rel=1e-6)
    assert t_ref == pytest.approx(t_tensor, rel=2e-2)
    # bf16 logits read directly by the fused op, with leading dims.
    bf = [(b[0].to(torch.bfloat16).reshape(4, 25, 33), b[1].reshape(4, 25)) for b in batches]
    assert mllmcal.fit_temperature(bf) == pytest.approx(t_ref, rel=1e-5)


def test_one_shot_generator_is_rejected_by_newton_with_advice():
    x, y = overconfident_data(100, 5, seed=2)
    gen = ((x[i : i + 10], y[i : i + 10]) for i in range(0, 100, 10))
    with pytest.raises(TypeError, match="one-shot.*onepass"):
        mllmcal.fit_temperature(gen, method="newton")


def test_grid_method_reproduces_paper_search():
    x, y = overconfident_data(300, 30, seed=3)
    y[::7] = -100  # ignored rows are skipped
    t, info = mllmcal.fit_temperature(x, y, method="grid", return_info=True, progress=False)
    assert len(PAPER_TEMPERATURE_GRID) == 999
    assert PAPER_TEMPERATURE_GRID[0] == 0.01 and PAPER_TEMPERATURE_GRID[-1] == 9.99
    assert t in PAPER_TEMPERATURE_GRID
    keep = y != -100
    ref = nll_f64(x[keep], y[keep], torch.tensor(PAPER_TEMPERATURE_GRID, dtype=torch.float64))
    k = PAPER_TEMPERATURE_GRID.index(t)
    assert ref[k] <= ref.min() * (1 + 1e-6)
    assert torch.allclose(info["grid_nll"] * int(keep.sum()), ref, rtol=1e-5)
    assert t == pytest.approx(mllmcal.fit_temperature(x, y), abs=0.011)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 300, 64)]
    assert mllmcal.fit_temperature(batches, method="grid", progress=False) == t


def test_masked_and_ignored_labels_are_skipped():
    x, y = overconfident_data(400, 12, seed=4)
    x2, y2 = x.clone(), y.clone()
    x2[:10, :] = -math.inf  # fully masked rows: invalid
    x2[10:20] = x2[10:20].index_fill(1, torch.tensor([0]), -math.inf)
    y2[10:20] = 0  # label is a masked token: probability 0, infinite NLL
    y2[20:30] = -100
    _, info = mllmcal.fit_temperature(x2, y2, return_info=True)
    t_expected = mllmcal.fit_temperature(x[30:], y[30:])
    assert info["n_masked_labels"] == 10 and info["n_rows"] == 370
    assert mllmcal.fit_temperature(x2, y2) == pytest.approx(t_expected, rel=1e-5)


def test_fitting_on_no_data_is_a_clear_error():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="no usable data"):
        mllmcal.fit_temperature(x, torch.full((5,), -100))
    with pytest.raises(ValueError, match="no usable data"):
        mllmcal.fit_temperature([])
    with pytest.raises(ValueError, match="labels are required"):
        mllmcal.fit_temperature(x)
    with pytest.raises(ValueError, match="method"):
        mllmcal.fit_temperature(x, torch.zeros(5, dtype=torch.long), method="lbfgs")


def test_positivity_on_separable_data_hits_bound_not_zero():
    x = torch.randn(50, 6) * 3
    y = x.argmax(-1)  # every prediction correct: NLL decreases as T -> 0
    t = mllmcal.fit_temperature(x, y, t_min=0.05)
    assert t == pytest.approx(0.05, rel=1e-5) and t > 0


def test_online_temperature_converges_to_offline_fit_on_stationary_stream():
    x, y = overconfident_data(9600, 20, seed=5)
    online = mllmcal.OnlineTemperature(init=1.0)
    traj = []
    for i in range(0, 9600, 64):
        stats = online.update(x[i : i + 64], y[i : i + 64])
        traj.append(online.temperature)
    assert stats.confidence.shape == (64,)
    t_off = mllmcal.fit_temperature(x, y)
    assert online.temperature == pytest.approx(t_off, rel=1e-2)
    assert abs(traj[-1] - t_off) < abs(traj[0] - t_off)
    with pytest.raises(ValueError, match="decay"):
        mllmcal.OnlineTemperature(decay=0.0)


def test_online_temperature_with_decay_tracks_a_drifting_stream():
    x1, y1 = overconfident_data(4000, 20, seed=6, t_true=2.0)
    x2, y2 = overconfident_data(4000, 20, seed=7, t_true=1.0)
    online = mllmcal.OnlineTemperature(init=1.0, decay=0.9)
    for x, y in ((x1, y1), (x2, y2)):
        for i in range(0, 4000, 100):
            online.update(x[i : i + 100], y[i : i + 100])
        t_off = mllmcal.fit_temperature(x, y)
        assert online.temperature == pytest.approx(t_off, rel=0.1)
