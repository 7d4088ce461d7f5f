"""CalibrationState: exact histogram, float64 definitions of its metrics, split/merge
invariance, serialisation, distributed all_reduce, bad input."""

import json
import math
import os
import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mllmcal
from mllmcal import reference as R
from mllmcal.calibration.state import BRIER_FIXED_POINT_SCALE, NLL_FIXED_POINT_SCALE
from mllmcal.reference import make_labels, make_logits


def random_pairs(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < conf.double() ** 1.5
    return conf, correct


def ece_f64(conf, correct, n_bins, norm):
    """ECE from its definition in docs/design.md, float64 sums, contract binning."""
    c = conf.double()
    b = torch.floor(conf.float() * n_bins).long().clamp(0, n_bins - 1)
    terms, weights = [], []
    for k in range(n_bins):
        m = b == k
        if m.any():
            terms.append(abs(float(correct[m].double().mean()) - float(c[m].mean())))
            weights.append(float(m.sum()) / len(c))
    if norm == "l1":
        return sum(w * t for w, t in zip(weights, terms, strict=True))
    if norm == "l2":
        return math.sqrt(sum(w * t * t for w, t in zip(weights, terms, strict=True)))
    return max(terms)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [1, 7, 15, 100])
def test_state_ece_and_accuracy_match_float64_definition(norm, n_bins):
    conf, correct = random_pairs(3001, seed=n_bins)
    s = mllmcal.CalibrationState(n_bins)
    s.update(conf, correct)
    assert s.count == 3001
    assert s.ece(norm) == pytest.approx(ece_f64(conf, correct, n_bins, norm), abs=1e-9)
    assert s.accuracy() == pytest.approx(float(correct.double().mean()), abs=1e-12)
    assert s.mean_confidence() == pytest.approx(float(conf.double().mean()), abs=1e-9)


def test_confidence_one_and_zero_land_in_edge_bins():
    s = mllmcal.CalibrationState(10)
    s.update(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([False, True, True]))
    counts = s.to_dict()["count"]
    assert counts[0] == 1 and counts[-1] == 2 and sum(counts) == 3


def test_update_logits_matches_reference_statistics():
    x = make_logits(257, 311, torch.float32, "masked", seed=4)
    y = make_labels(257, 311, seed=4)
    s = mllmcal.CalibrationState(15)
    stats = s.update_logits(x, y, temperature=1.7)
    ref = R.token_stats(x, y, 1.7)
    keep = ref.valid & (y != -100)
    assert s.count == int(keep.sum())
    # Histogram: same bins/sums as binning the reference-checked kernel confidences.
    s2 = mllmcal.CalibrationState(15)
    s2.update(stats.confidence[keep], stats.correct[keep])
    assert s.to_dict()["count"] == s2.to_dict()["count"]
    assert s.to_dict()["sum_correct"] == s2.to_dict()["sum_correct"]
    assert s.to_dict()["sum_confidence_fixed"] == s2.to_dict()["sum_confidence_fixed"]
    assert s.nll() == pytest.approx(float(-ref.label_logprob[keep].mean()), rel=1e-5)
    assert s.brier() == pytest.approx(float(ref.brier[keep].mean()), rel=1e-5)
    assert s.ece() == pytest.approx(
        ece_f64(ref.confidence[keep], ref.correct[keep], 15, "l1"), abs=1e-5
    )


def test_hostile_rows_are_skipped_and_masked_labels_make_nll_infinite():
    x = make_logits(60, 40, torch.float32, "nan", seed=2)
    y = make_labels(60, 40, seed=2)
    s = mllmcal.CalibrationState()
    s.update_logits(x, y)
    ref = R.token_stats(x, y)
    assert s.count == int((ref.valid & (y != -100)).sum())
    assert math.isfinite(s.nll())
    x2 = torch.randn(3, 5)
    x2[0, 2] = -math.inf
    s.update_logits(x2, torch.tensor([2, 1, 0]))
    assert s.nll() == math.inf and math.isfinite(s.brier())


def _split_points(draw_list, n):
    return sorted({min(n, p) for p in draw_list})


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 300),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    seed=st.integers(0, 2**31 - 1),
    n_bins=st.integers(1, 40),
    permute=st.booleans(),
)
def test_any_split_merged_in_any_order_gives_identical_dict(n, cuts, seed, n_bins, permute):
    conf, correct = random_pairs(n, seed)
    whole = mllmcal.CalibrationState(n_bins)
    whole.update(conf, correct)
    bounds = [0, *_split_points(cuts, n), n]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        p = mllmcal.CalibrationState(n_bins)
        p.update(conf[a:b], correct[a:b])
        parts.append(p)
    if permute:
        parts = parts[::-1]
    merged = mllmcal.CalibrationState(n_bins)
    for p in parts:
        merged.merge(p)
    assert merged.to_dict() == whole.to_dict()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.integers(0, 64), v=st.sampled_from([3, 50, 257]))
def test_update_logits_split_invariant_including_nll_and_brier(seed, cut, v):
    x = make_logits(64, v, torch.float32, "masked", seed=seed)
    y = make_labels(64, v, seed=seed)
    whole = mllmcal.CalibrationState(20)
    whole.update_logits(x, y, temperature=0.9)
    a, b = mllmcal.CalibrationState(20), mllmcal.CalibrationState(20)
    b.update_logits(x[cut:], y[cut:], temperature=0.9)
    a.update_logits(x[:cut], y[:cut], temperature=0.9)
    assert (b + a).to_dict() == whole.to_dict()
    # The fixed-point sums agree with the float64 sums to their resolution per row.
    d, n = whole.to_dict(), whole.count
    ref = R.token_stats(x, y, 0.9)
    keep = ref.valid & (y != -100) & torch.isfinite(ref.label_logprob)
    if n and d["n_nll_overflow"] == 0:
        assert d["sum_nll_fixed"] / NLL_FIXED_POINT_SCALE == pytest.approx(
            float(-ref.label_logprob[keep].sum()), rel=1e-5, abs=n * 1e-6)
        assert d["sum_brier_fixed"] / BRIER_FIXED_POINT_SCALE == pytest.approx(
            float(ref.brier[keep].sum()), rel=1e-5, abs=n * 1e-6)


def test_dict_roundtrip_through_json_and_reset():
    conf, correct = random_pairs(500, 3)
    s = mllmcal.CalibrationState(12)
    s.update(conf, correct)
    s.update_logits(make_logits(20, 30, seed=1), make_labels(20, 30, seed=1))
    d = json.loads(json.dumps(s.to_dict()))
    s2 = mllmcal.CalibrationState.from_dict(d)
    assert s2.to_dict() == s.to_dict() and s2.ece() == s.ece() and s2.nll() == s.nll()
    s2.reset()
    assert s2.count == 0 and s2.n_bins == 12
    with pytest.raises(ValueError, match="empty"):
        s2.ece()


def test_memory_is_constant_in_the_number_of_updates():
    s = mllmcal.CalibrationState(15)
    before = s.nbytes()
    ids = (s.hist.data_ptr(), s.totals.data_ptr())
    for seed in range(50):
        s.update(*random_pairs(1000, seed))
    assert s.count == 50_000
    assert s.nbytes() == before == 16 * (3 * 15 + 4)
    assert (s.hist.data_ptr(), s.totals.data_ptr()) == ids


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        mllmcal.CalibrationState(0)
    s = mllmcal.CalibrationState(5)
    with pytest.raises(ValueError, match="same number of elements"):
        s.update(torch.rand(4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.update(torch.tensor([0.5, 1.5]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.update(torch.tensor([0.5, math.nan]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="0/1"):
        s.update(torch.tensor([0.5, 0.2]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="different n_bins"):
        s.merge(mllmcal.CalibrationState(6))
    meta = mllmcal.CalibrationState(5, device="meta")
    with pytest.raises(ValueError, match="different devices"):
        mllmcal.CalibrationState(5, device="cpu").merge(meta)
    with pytest.raises(ValueError, match="lives on cpu"):
        mllmcal.CalibrationState(5, device="cpu").update(
            torch.rand(2, device="meta"), torch.ones(2, dtype=torch.bool, device="meta"),
            validate=False)
    with pytest.raises(ValueError, match="update_logits"):
        s.update(torch.rand(3), torch.ones(3, dtype=torch.bool))
        s.nll()
    with pytest.raises(RuntimeError, match="init_process_group"):
        s.all_reduce()


# --------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, out_path):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = make_logits(90, 37, torch.float32, "masked", seed=11)
        y = make_labels(90, 37, seed=11)
        s = mllmcal.CalibrationState(15)
        # Uneven shards: rank 0 gets rows [0, 30), rank 1 gets [30, 90).
        lo, hi = (0, 30) if rank == 0 else (30, 90)
        s.update_logits(x[lo:hi], y[lo:hi])
        s.all_reduce()
        if rank == 1:
            with open(out_path, "w") as f:
                json.dump(s.to_dict(), f)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_all_reduce_equals_one_pass(tmp_path):
    out = tmp_path / "rank1.json"
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    one = mllmcal.CalibrationState(15)
    one.update_logits(make_logits(90, 37, torch.float32, "masked", seed=11),
                      make_labels(90, 37, seed=11))
    assert json.loads(out.read_text()) == one.to_dict()


def test_update_logits_leading_dims_half_precision_and_per_row_temperature():
    x = make_logits(2 * 40, 129, torch.bfloat16, "masked", seed=8).reshape(2, 40, 129)
    y = make_labels(80, 129, seed=8).reshape(2, 40)
    t = torch.rand(2, 40, generator=torch.Generator().manual_seed(0)) + 0.5
    s = mllmcal.CalibrationState(10)
    s.update_logits(x, y, temperature=t)
    ref = R.token_stats(x, y, t)
    keep = ref.valid & (y.reshape(-1) != -100)
    assert s.count == int(keep.sum())
    assert s.ece() == pytest.approx(ece_f64(ref.confidence[keep], ref.correct[keep], 10, "l1"), abs=1e-5)
    assert s.nll() == pytest.approx(float(-ref.label_logprob[keep].mean()), rel=1e-5)


def test_update_refuses_pairs_of_different_shapes():
    # a [2, 3] confidence and a [3, 2] correctness have six elements each, but flattening
    # would pair confidence[0, 1] with correct[0, 1] of another layout
    s = mllmcal.CalibrationState(10)
    with pytest.raises(ValueError, match="same shape"):
        s.update(torch.rand(2, 3), torch.ones(3, 2, dtype=torch.bool))
    assert s.count == 0
    s.update(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool))
    assert s.count == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_update_hidden_equals_update_logits_of_the_fp32_logits(dtype, with_bias):
    g = torch.Generator().manual_seed(7)
    h = (torch.randn(3, 7, 24, generator=g) * 2).to(dtype)  # [B, L, H], odd sizes
    w = (torch.randn(1001, 24, generator=g) * 0.4).to(dtype)  # [V, H], V past a tile edge
    bias = torch.randn(1001, generator=g).to(dtype) if with_bias else None
    y = torch.randint(0, 1001, (3, 7), generator=g)
    y[0, :3] = -1  # a custom ignore_index
    logits = h.float() @ w.float().T + (bias.float() if with_bias else 0.0)
    a, b = mllmcal.CalibrationState(n_bins=10), mllmcal.CalibrationState(n_bins=10)
    sa = a.update_hidden(h, w, y, 1.3, bias=bias, ignore_index=-1)
    sb = b.update_logits(logits, y, 1.3, ignore_index=-1)
    assert sa.confidence.shape == (3, 7) and a.count == b.count == 18
    assert torch.equal(a.hist[0], b.hist[0]) and torch.equal(a.hist[2], b.hist[2])
    assert torch.allclose(sa.label_logprob.nan_to_num(), sb.label_logprob.nan_to_num(),
                          rtol=1e-5, atol=1e-5)
    assert a.nll() == pytest.approx(b.nll(), rel=1e-5)
    assert a.brier() == pytest.approx(b.brier(), rel=1e-5)
    with pytest.raises(ValueError, match="histogram needs labels"):
        a.update_hidden(h, w, None)
