"""CalibrationState at corpus scale: two-limb sums stay exact past 2**33 and 2**40 rows and
raise (never wrap) at their limit; from_dict rejects tampered dicts; all_reduce between ranks
with different layouts raises on every rank instead of hanging."""

import json
import math
import os
import textwrap

import pytest
import torch
from helpers import run_two_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

import mllmcal
from mllmcal.calibration import state as S
from mllmcal.reference import make_labels, make_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_state(n_bins=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(997, generator=g).clamp_min(0.05)
    correct = torch.rand(997, generator=g) < conf
    s = mllmcal.CalibrationState(n_bins)
    s.update(conf, correct)
    s.update_logits(make_logits(123, 57, torch.float32, "masked", seed=seed),
                    make_labels(123, 57, seed=seed))
    return s


def doubled(s, k):
    for _ in range(k):
        s = s + s
    return s


def scaled_dict(d, k):
    out = dict(d)
    for key in ("count", "sum_confidence_fixed", "sum_correct"):
        out[key] = [v << k for v in d[key]]
    for key in ("n_scored", "sum_nll_fixed", "sum_brier_fixed", "n_nll_overflow"):
        out[key] = d[key] << k
    return out


@pytest.mark.parametrize("k", [33, 40])
def test_states_past_2_33_and_2_40_rows_built_by_merges_stay_exact(k):
    s0 = base_state()
    d0 = s0.to_dict()
    big = doubled(s0.copy(), k)
    assert big.count == s0.count << k and big.count > 2**k
    assert big.to_dict() == scaled_dict(d0, k)  # every sum exactly base · 2**k
    # Means are ratios of exact integers: identical to the base state's up to one rounding.
    for name in ("accuracy", "mean_confidence", "nll", "brier"):
        assert getattr(big, name)() == pytest.approx(getattr(s0, name)(), rel=1e-15), name
    assert 0 < big.mean_confidence() < 1
    for norm in ("l1", "l2", "max"):
        assert big.ece(norm) == pytest.approx(s0.ece(norm), rel=1e-12)
    # The metrics module reads the same exact sums.
    assert mllmcal.metrics.ece(big) == pytest.approx(s0.ece(), rel=1e-12)
    # Round trip through JSON with ints above 2**63.
    back = mllmcal.CalibrationState.from_dict(json.loads(json.dumps(big.to_dict())))
    assert back.to_dict() == big.to_dict()


def test_merges_raise_at_the_limit_and_leave_the_state_unchanged():
    s = base_state()
    rows = s.count
    k = 0
    while True:
        before = s.to_dict()
        try:
            s.merge(s.copy())
        except OverflowError as e:
            assert "limit" in str(e)
            break
        k += 1
        assert k < 100
    assert s.to_dict() == before
    # The first sum to run out is Σ confidence, past 2**62 rows of this data.
    assert rows << k >= 2**62
    assert s.mean_confidence() == pytest.approx(base_state().mean_confidence(), rel=1e-15)


def test_updates_on_a_state_beyond_int64_stay_exact():
    s0 = base_state()
    big = mllmcal.CalibrationState.from_dict(scaled_dict(s0.to_dict(), 50))
    small = base_state(seed=1)
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(997, generator=g).clamp_min(0.05)
    correct = torch.rand(997, generator=g) < conf
    big.update(conf, correct)
    big.update_logits(make_logits(123, 57, torch.float32, "masked", seed=1),
                      make_labels(123, 57, seed=1))
    expect = scaled_dict(s0.to_dict(), 50)
    d1 = small.to_dict()
    for key in ("count", "sum_confidence_fixed", "sum_correct"):
        expect[key] = [a + b for a, b in zip(expect[key], d1[key], strict=True)]
    for key in ("n_scored", "sum_nll_fixed", "sum_brier_fixed", "n_nll_overflow"):
        expect[key] += d1[key]
    assert big.to_dict() == expect


def test_carries_in_the_update_loop_keep_sums_exact(monkeypatch):
    # Force a carry every few rows: the result must equal the carry-free state exactly.
    conf = torch.rand(5000, generator=torch.Generator().manual_seed(3))
    correct = conf > 0.4
    ref = mllmcal.CalibrationState(10)
    ref.update(conf, correct)
    monkeypatch.setattr(S, "_CARRY_AT", 64)
    s = mllmcal.CalibrationState(10)
    for a in range(0, 5000, 50):
        s.update(conf[a:a + 50], correct[a:a + 50])
    assert s.to_dict() == ref.to_dict()
    with pytest.raises(ValueError, match="2\\*\\*30 rows"):
        S.CalibrationState(3)._reserve(2**30 + 1)


def test_huge_per_row_nll_sums_past_int64_exactly():
    # NLL = 1e9 nats per row is 2**53.9 fixed-point units: 20000 rows sum past 2**63.
    n = 20000
    x = torch.zeros(n, 2)
    x[:, 1] = -1e9
    s = mllmcal.CalibrationState(5)
    s.update_logits(x, torch.ones(n, dtype=torch.long))
    d = s.to_dict()
    per_row = int(torch.tensor(1e9, dtype=torch.float32).double() * 2**24 + 0.5)
    assert d["sum_nll_fixed"] == n * per_row > 2**63
    assert s.nll() == pytest.approx(1e9, rel=1e-7)


# --------------------------------------------------------------------------- from_dict


def _good():
    return base_state(n_bins=5).to_dict()


def _tamper(**changes):
    d = _good()
    for key, fn in changes.items():
        d[key] = fn(d[key])
    return d


@pytest.mark.parametrize("d, match", [
    (_tamper(count=lambda v: [-1, *v[1:]]), r"count\[0\] = -1"),
    (_tamper(sum_correct=lambda v: [x * 6 + 1 for x in v]), "sum_correct .* > count"),
    (_tamper(count=lambda v: [float(x) for x in v]), r"count\[0\] = \d+\.0"),
    (_tamper(count=lambda v: [v[0] + 0.5, *v[1:]]), r"count\[0\]"),
    (_tamper(count=lambda v: [True, *v[1:]]), r"count\[0\] = True"),
    (_tamper(n_bins=lambda v: "5"), "n_bins must be an int"),
    (_tamper(n_bins=lambda v: 0), "n_bins must be an int >= 1"),
    (_tamper(sum_correct=lambda v: v[:-1]), "4 entries, expected n_bins=5"),
    (_tamper(format=lambda v: "something/9"), "format"),
    (_tamper(sum_confidence_fixed=lambda v: [x + (1 << 40) for x in v]),
     "sum_confidence_fixed .* outside"),
    (_tamper(sum_confidence_fixed=lambda v: [0 for _ in v]), "outside"),
    (_tamper(n_scored=lambda v: -3), "n_scored = -3"),
    (_tamper(n_nll_overflow=lambda v: 10**6), "n_nll_overflow .* > n_scored"),
    (_tamper(n_scored=lambda v: 10**9), "n_scored .* > total count"),
    (_tamper(sum_brier_fixed=lambda v: 10**20), "sum_brier_fixed .* exceeds"),
    (_tamper(sum_nll_fixed=lambda v: 10**25), "sum_nll_fixed .* exceeds"),
    (_tamper(sum_nll_fixed=lambda v: 2**100), "limit 2\\*\\*94"),
    (_tamper(count=lambda v: {"a": 1}), "count must be a list"),
])
def test_from_dict_rejects_tampered_dicts_naming_the_problem(d, match):
    with pytest.raises(ValueError, match=match):
        mllmcal.CalibrationState.from_dict(d)


def test_from_dict_names_missing_and_unexpected_keys_and_non_dicts():
    d = _good()
    del d["sum_correct"]
    d["bogus"] = 1
    with pytest.raises(ValueError, match=r"missing keys \['sum_correct'\].*unexpected keys"):
        mllmcal.CalibrationState.from_dict(d)
    with pytest.raises(TypeError, match="needs a dict"):
        mllmcal.CalibrationState.from_dict([1, 2])


def test_from_dict_reads_version_1_dicts():
    d = _good()
    d["format"] = "mllmcal.CalibrationState/1"
    assert mllmcal.CalibrationState.from_dict(d).to_dict() == _good()


# --------------------------------------------------------------------------- all_reduce

_RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    import mllmcal
    from mllmcal.reference import make_labels, make_logits
    rank, world, port, mode, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    result = {}
    try:
        if mode == "mismatch":
            s = mllmcal.CalibrationState(15 if rank == 0 else 10)
            s.update(torch.rand(10), torch.rand(10) > 0.5)
        else:
            s = mllmcal.CalibrationState(15)
            s.update_logits(make_logits(40, 33, seed=rank), make_labels(40, 33, seed=rank))
            for _ in range(45):  # past 2**45 rows on each rank
                s = s + s
        s.all_reduce()
        result = {"ok": s.to_dict()}
    except Exception as e:  # report what this rank raised
        result = {"error": type(e).__name__, "message": str(e)}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
""")


def _run_two_ranks(tmp_path, mode):
    return run_two_ranks(_RANK_SCRIPT, tmp_path, mode, ROOT)


def test_two_process_all_reduce_with_mismatched_n_bins_raises_on_both_ranks(tmp_path):
    results = _run_two_ranks(tmp_path, "mismatch")
    for r in results:
        assert r.get("error") == "ValueError", r
        assert "n_bins from 10 to 15" in r["message"]


def test_two_process_all_reduce_of_states_past_2_45_rows_is_exact(tmp_path):
    results = _run_two_ranks(tmp_path, "big")
    one = mllmcal.CalibrationState(15)
    for rank in range(2):
        one.update_logits(make_logits(40, 33, seed=rank), make_labels(40, 33, seed=rank))
    expect = scaled_dict(one.to_dict(), 45)
    assert results[0] == results[1] == {"ok": expect}
    assert math.isfinite(mllmcal.CalibrationState.from_dict(expect).nll())


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=5), seed=st.integers(0, 2**31 - 1),
       shift=st.sampled_from([0, 31, 47, 52]), reverse=st.booleans())
def test_any_split_on_top_of_a_huge_state_merges_to_the_same_exact_dict(cuts, seed, shift,
                                                                         reverse):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(400, generator=g)
    correct = torch.rand(400, generator=g) < conf
    big = scaled_dict(base_state(n_bins=7).to_dict(), shift)  # up to ~2**93 units per sum
    whole = mllmcal.CalibrationState.from_dict(big)
    whole.update(conf, correct)
    bounds = [0, *sorted(cuts), 400]
    parts = [mllmcal.CalibrationState.from_dict(big)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        p = mllmcal.CalibrationState(7)
        p.update(conf[a:b], correct[a:b])
        parts.append(p)
    if reverse:
        parts = parts[::-1]
    merged = mllmcal.CalibrationState(7)
    for p in parts:
        merged.merge(p)
    assert merged.to_dict() == whole.to_dict()
