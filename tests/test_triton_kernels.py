"""The Triton backend: both launch paths under TRITON_INTERPRET=1 against the float64
oracle, and an ahead-of-time compile of every kernel for sm_90 (interpreter off).

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports Triton. The
interpreter pays per operation, so tests use large blocks and few rows; blocks smaller
than V are still used on purpose so that chunk and split boundaries are crossed.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_matches_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mllmcal
from mllmcal import ops
from mllmcal._backends import launch
from mllmcal.reference import HOSTILE_KINDS, make_labels, make_logits

triton = pytest.importorskip("triton")
K = pytest.importorskip("mllmcal.kernels.token_stats")
TRITON_BACKEND = pytest.importorskip("mllmcal.kernels.backend")

pytestmark = [
    pytest.mark.skipif(
        not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
        reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
    ),
    # NumPy, standing in for the GPU, warns on inf - inf / 0 * inf in the lanes of invalid
    # rows; those values are discarded by tl.where, as they are on the device.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def forced(monkeypatch):
    """Route ``mllmcal.token_stats(..., backend="triton")`` through given kernel knobs, so
    each path is tested behind the public op (reshape, validation, result assembly)."""

    def use(**knobs):
        monkeypatch.setattr(
            TRITON_BACKEND, "token_stats_into", functools.partial(_ORIGINAL_INTO, **knobs)
        )

    return use


_ORIGINAL_INTO = K.token_stats_into
PATHS = [
    pytest.param({"path": "row"}, id="row"),
    pytest.param({"path": "split"}, id="split"),
]


def _stats(x, y=None, t=1.0, **kw):
    return mllmcal.token_stats(x, y, temperature=t, backend="triton", **kw)


@pytest.mark.parametrize("knobs", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "v, n, block_v, per_row_t",
    [(1, 5, 16, False), (7, 9, 16, True), (50257, 3, 4096, False), (131075, 1, 4096, True)],
)
def test_odd_vocab_sizes_match_reference(forced, knobs, dtype, v, n, block_v, per_row_t):
    forced(block_v=block_v, **knobs)
    x = make_logits(n, v, dtype, "normal", seed=v + n, device=DEVICE)
    y = make_labels(n, v, seed=v, device=DEVICE)
    t = (torch.rand(n, generator=torch.Generator().manual_seed(v)) * 2 + 0.3).to(DEVICE) \
        if per_row_t else 1.3
    hist = torch.zeros(3, 15, dtype=torch.long, device=DEVICE)
    s = _stats(x, y, t, histogram=hist)
    assert s.backend == "triton"
    assert_matches_reference(s, x, y, t, hist=hist, hist_before=torch.zeros_like(hist))


@pytest.mark.parametrize("knobs", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_inputs_match_reference(forced, knobs, dtype, kind):
    # 333 columns in blocks of 128: three chunks per row, and up to three splits.
    forced(block_v=128, **knobs)
    x = make_logits(9, 333, dtype, kind, seed=sum(map(ord, kind)), device=DEVICE)
    y = make_labels(9, 333, seed=3, device=DEVICE)
    t = (torch.rand(9, generator=torch.Generator().manual_seed(1)) * 2 + 0.25).to(DEVICE)
    hist = torch.randint(0, 5, (3, 10), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    before = hist.clone()
    s = _stats(x, y, t, histogram=hist)
    assert_matches_reference(s, x, y, t, hist=hist, hist_before=before)
    if kind in ("nan", "posinf", "fully_masked"):
        assert not bool(s.valid.all()) and bool(s.valid.any())


@pytest.mark.parametrize("knobs", PATHS)
def test_lowest_index_wins_ties_across_chunks_and_splits(forced, knobs):
    forced(block_v=64, splits=4, **knobs)
    v = 300
    x = torch.full((3, v), -2.0, device=DEVICE)
    x[0, [250, 70, 71]] = 5.0  # max in chunks 1 and 3: the earlier chunk's index wins
    x[1, [299, 0]] = 5.0  # first and last column
    x[2, 64:128] = 5.0  # a whole chunk of maxima
    s = _stats(x)
    assert s.prediction.tolist() == [70, 0, 64]
    assert_matches_reference(s, x)


@pytest.mark.parametrize("knobs", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_write_in_place_matches_division(forced, knobs, dtype):
    forced(block_v=128, **knobs)
    x = make_logits(6, 257, dtype, "masked", seed=11, device=DEVICE)
    y = make_labels(6, 257, seed=11, ignore_frac=0.0, device=DEVICE)
    orig = x.clone()
    # In place: each label logit must be read as x[y] before it is overwritten by z[y].
    s = _stats(x, y, 0.6, scaled_out=x)
    assert_matches_reference(s, orig, y, 0.6, scaled_out=x)


@pytest.mark.parametrize("knobs", PATHS)
def test_scaled_write_to_separate_non_contiguous_output(forced, knobs):
    forced(block_v=64, **knobs)
    x = make_logits(8 * 2, 101, torch.bfloat16, "normal", seed=4, device=DEVICE)
    x = x.reshape(8, 2, 101)[:, 1, :]  # row stride 2 * V
    out_base = torch.zeros(8, 2, 101, dtype=torch.bfloat16, device=DEVICE)
    out = out_base[:, 1, :]  # its own row stride, also 2 * V
    t = torch.linspace(0.5, 2.0, 8, device=DEVICE)
    y = make_labels(8, 101, seed=4, device=DEVICE)
    s = _stats(x, y, t, scaled_out=out)
    assert_matches_reference(s, x, y, t, scaled_out=out)
    assert not bool(out_base[:, 0].any()), "wrote outside scaled_out's rows"


@pytest.mark.parametrize("knobs", PATHS)
def test_non_contiguous_rows_and_leading_dims(forced, knobs):
    forced(block_v=64, **knobs)
    base = make_logits(4 * 6, 101, torch.float32, "masked", seed=5, device=DEVICE)
    x = base.reshape(4, 6, 101)[:, ::3, :]
    y = make_labels(8, 101, seed=5, device=DEVICE).reshape(4, 2)
    s = _stats(x, y, 0.8)
    assert s.confidence.shape == (4, 2)
    assert_matches_reference(s, x, y, 0.8)


@pytest.mark.parametrize("knobs", PATHS)
def test_repeated_and_overlapping_rows(forced, knobs):
    """Row stride 0 (expand) and overlapping rows (unfold) are read as they are."""
    forced(block_v=64, **knobs)
    row = make_logits(1, 201, torch.bfloat16, "masked", seed=41, device=DEVICE)
    rep = row.expand(3, 201)
    y = make_labels(3, 201, seed=41, device=DEVICE)
    s = _stats(rep, y, 1.2)
    assert_matches_reference(s, rep.contiguous(), y, 1.2)
    flat = make_logits(1, 300, torch.float32, "normal", seed=42, device=DEVICE).reshape(300)
    win = flat.unfold(0, 129, 40)  # [5, 129], rows 40 apart
    t = torch.linspace(0.5, 2.0, win.shape[0], device=DEVICE)
    yw = make_labels(win.shape[0], 129, seed=42, device=DEVICE)
    s = _stats(win, yw, t)
    assert_matches_reference(s, win.contiguous(), yw, t)


@pytest.mark.parametrize("knobs", PATHS)
def test_masked_label_gives_minus_inf_logprob_and_finite_brier(forced, knobs):
    forced(block_v=16, **knobs)
    x = make_logits(2, 40, torch.float32, "normal", seed=8, device=DEVICE)
    x[:, 33] = float("-inf")
    y = torch.tensor([33, 33], device=DEVICE)
    s = _stats(x, y)
    assert torch.isneginf(s.label_logprob).all() and torch.isfinite(s.brier).all()
    assert_matches_reference(s, x, y)


def test_histogram_adds_are_exact_per_path_and_invariant_to_row_batches():
    x = make_logits(10, 500, torch.float32, "peaked", seed=21, device=DEVICE)
    x[3] = float("nan")  # an invalid row must not enter any histogram
    y = make_labels(10, 500, seed=21, device=DEVICE)
    keep = (y != -100) & (torch.arange(10, device=DEVICE) != 3)
    hists = []
    for knobs in ({"path": "row"}, {"path": "split", "splits": 2}, {"path": "split", "splits": 7}):
        fstats = torch.empty(7, 10, device=DEVICE)
        pred = torch.empty(10, dtype=torch.long, device=DEVICE)
        flags = torch.empty(10, dtype=torch.uint8, device=DEVICE)
        hist = torch.zeros(3, 12, dtype=torch.long, device=DEVICE)
        _ORIGINAL_INTO(x, y, 1.0, None, fstats, pred, flags, None, hist, -100,
                       block_v=64, **knobs)
        # Exactly the integer adds of this path's own fp32 confidences.
        conf, correct = fstats[1], (flags & 2) != 0
        expected = torch.zeros_like(hist)
        ops.histogram_add_(expected, conf, correct, keep)
        assert torch.equal(hist, expected), knobs
        hists.append(hist)
        # Batches of rows in any split add up to the same integers (same path, same knobs).
        halves = torch.zeros_like(hist)
        for rows in (slice(0, 4), slice(4, 10)):
            _ORIGINAL_INTO(x[rows], y[rows], 1.0, None, fstats[:, rows].contiguous(),
                           pred[rows].clone(), flags[rows].clone(), None, halves, -100,
                           block_v=64, **knobs)
        assert torch.equal(halves, hist), knobs
    # Across paths the fp32 sums run in a different order, so a confidence may differ in
    # its last bits: counts and correct sums agree exactly, Σ conf to a few ulps per row.
    for h in hists[1:]:
        assert torch.equal(h[0], hists[0][0]) and torch.equal(h[2], hists[0][2])
        assert int((h[1] - hists[0][1]).abs().max()) <= 10 * 2**32 * 1e-6
    assert int(hists[0][0].sum()) == int(keep.sum())


def test_auto_knobs_match_reference_on_both_sides_of_the_path_choice(monkeypatch):
    # Default block size and path choice, on a pretend 4-SM GPU so that few rows reach
    # the row path: 3 rows -> split path, 9 rows (>= 2 * SMs) -> row path.
    monkeypatch.setattr(launch, "DEFAULT_SM_COUNT", 4)
    for n, v in ((3, 9000), (9, 33)):
        x = make_logits(n, v, torch.bfloat16, "masked", seed=n, device=DEVICE)
        y = make_labels(n, v, seed=n, device=DEVICE)
        splits = launch.plan_splits(n, v, launch.DEFAULT_SM_COUNT, K.default_block_v(v),
                                    K.MAX_SPLITS)
        assert (splits > 1) == (n == 3)
        assert_matches_reference(_stats(x, y, 0.9), x, y, 0.9)


def test_split_plan_fills_the_gpu_and_respects_block_size():
    def plan(n, v, sm, block_v):
        return launch.plan_splits(n, v, sm, block_v, K.MAX_SPLITS)

    assert plan(4096, 131072, 132, 2048) == 1  # row path
    assert plan(1, 131072, 132, 2048) == 64  # one chunk per split at most
    splits = plan(64, 131072, 132, 2048)
    assert splits > 1 and 64 * splits >= 4 * 132
    assert plan(8, 1000, 132, 1024) == 1  # nothing to split


def test_bad_knobs_are_clear_errors():
    x = torch.randn(2, 10, device=DEVICE)
    bufs = (torch.empty(7, 2, device=DEVICE), torch.empty(2, dtype=torch.long, device=DEVICE),
            torch.empty(2, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        _ORIGINAL_INTO(x, None, 1.0, None, *bufs, None, None, -100, block_v=100)
    with pytest.raises(ValueError, match="path"):
        _ORIGINAL_INTO(x, None, 1.0, None, *bufs, None, None, -100, path="diagonal")
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        _ORIGINAL_INTO(x.double(), None, 1.0, None, *bufs, None, None, -100)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5),
    v=st.integers(1, 700),
    dtype=st.sampled_from(DTYPES),
    path=st.sampled_from(["row", "split"]),
    block_v=st.sampled_from([64, 256]),
    mask_frac=st.floats(0.0, 0.95),
    scale=st.floats(0.1, 40.0),
    temperature=st.one_of(st.just(1.0), st.floats(0.05, 5.0)),
    seed=st.integers(0, 2**16),
)
def test_property_random_rows_match_reference(
    n, v, dtype, path, block_v, mask_frac, scale, temperature, seed
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * scale
    x[torch.rand(n, v, generator=g) < mask_frac] = float("-inf")
    x = x.to(dtype).to(DEVICE)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    y = y.to(DEVICE)
    fstats = torch.empty(7, n, device=DEVICE)
    pred = torch.empty(n, dtype=torch.long, device=DEVICE)
    flags = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    hist = torch.zeros(3, 15, dtype=torch.long, device=DEVICE)
    out = torch.empty_like(x)
    _ORIGINAL_INTO(x, y, temperature, None, fstats, pred, flags, out, hist, -100,
                   path=path, block_v=block_v)
    s = mllmcal.TokenStats(
        logsumexp=fstats[0], confidence=fstats[1], prediction=pred, entropy=fstats[2],
        valid=(flags & 1) != 0, logit_mean=fstats[5], logit_var=fstats[6],
        label_logprob=fstats[3], brier=fstats[4], correct=(flags & 2) != 0,
    )
    assert_matches_reference(s, x, y, temperature, scaled_out=out, hist=hist,
                             hist_before=torch.zeros_like(hist))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, **env},
    )


def test_missing_triton_is_an_import_error_not_a_broken_package():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import mllmcal\n"
        "try:\n"
        "    import mllmcal.kernels.token_stats\n"
        "except ImportError:\n"
        "    print('import-error')\n"
        "print(mllmcal.available_backends('cpu'))\n"
    )
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "import-error" and "triton" not in lines[1]


def test_every_kernel_compiles_ahead_of_time_for_sm90_without_spills():
    # Kernels built under TRITON_INTERPRET=1 are interpreter objects, not JITFunctions:
    # compile in a fresh process with the interpreter off.
    res = _run_python(
        "import json, sys; sys.path.insert(0, 'tools'); import aot; "
        "print(json.dumps(aot.token_stats_report(90)))",
        TRITON_INTERPRET="0",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    kernels = {(r["kernel"], r["dtype"]) for r in report}
    for dtype in ("float32", "float16", "bfloat16"):
        assert ("row", dtype) in kernels and ("split", dtype) in kernels
    assert ("merge", "float32") in kernels
    for r in report:
        assert r["ptx_chars"] > 0
        if r["kernel"] != "merge" and r["aligned"]:
            # 16-byte vector loads of the logits: 8 fp32 or 8 16-bit elements per thread.
            assert r["ld_global_v4"] >= 1, r
        if r["kernel"] != "merge":
            assert r["mul_lo_s64"] >= 1, r  # row * stride in 64 bits (N * V > 2^31)
        if "spill_stores" in r:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_statistics_carry_no_gradient():
    """The same autograd behaviour as every other backend: no field requires grad."""
    x = make_logits(3, 70, torch.float32, "normal", seed=61, device=DEVICE).requires_grad_()
    s = _stats(x * 1.5, torch.tensor([1, 5, -100], device=DEVICE), 1.2)
    assert not any(t.requires_grad for t in s.as_dict().values())
