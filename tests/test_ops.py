"""token_stats on the CPU backends (torch composite and the C++ kernel) vs the oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mllmcal
from mllmcal.testing import (
    HOSTILE_KINDS,
    assert_matches_reference,
    make_labels,
    make_logits,
)

CPU_BACKENDS = [b for b in ("torch", "cpu") if b in mllmcal.available_backends("cpu")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 7, 50257, 131075])
def test_odd_vocab_sizes_match_reference(backend, dtype, v):
    n = 3 if v > 10000 else 17
    x = make_logits(n, v, dtype, "normal", seed=v)
    y = make_labels(n, v, seed=v)
    s = mllmcal.token_stats(x, y, temperature=1.3, backend=backend)
    assert s.backend == backend
    assert_matches_reference(s, x, y, 1.3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hostile_inputs_match_reference(backend, kind, dtype):
    x = make_logits(12, 333, dtype, kind, seed=hash(kind) % 1000)
    y = make_labels(12, 333, seed=3)
    t = torch.rand(12, generator=torch.Generator().manual_seed(1)) * 2 + 0.25
    hist = torch.zeros(3, 15, dtype=torch.long)
    before = hist.clone()
    s = mllmcal.token_stats(x, y, temperature=t, backend=backend, histogram=hist)
    assert_matches_reference(s, x, y, t, hist=hist, hist_before=before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_rows_and_leading_dims(backend):
    base = make_logits(4 * 2 * 3, 101, torch.float32, "masked", seed=5).reshape(4, 6, 101)
    x = base[:, ::3, :]  # row stride 3 * V, leading shape (4, 2)
    y = make_labels(8, 101, seed=5).reshape(4, 2)
    s = mllmcal.token_stats(x, y, temperature=0.8, backend=backend)
    assert s.confidence.shape == (4, 2)
    assert_matches_reference(s, x, y, 0.8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_out_in_place(backend, dtype):
    x = make_logits(9, 257, dtype, "masked", seed=11)
    orig = x.clone()
    s = mllmcal.token_stats(x, temperature=0.6, backend=backend, scaled_out=x)
    assert_matches_reference(s, orig, None, 0.6, scaled_out=x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_returns_empty(backend):
    s = mllmcal.token_stats(torch.empty(0, 10), backend=backend)
    assert s.confidence.shape == (0,) and s.prediction.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"logits": torch.ones(2, 3, dtype=torch.int64)}, TypeError, "float32"),
        ({"logits": torch.ones(2, 0)}, ValueError, "V = 0"),
        ({"logits": torch.ones(2, 3), "temperature": 0.0}, ValueError, "temperature"),
        ({"logits": torch.ones(2, 3), "temperature": float("nan")}, ValueError, "temperature"),
        ({"logits": torch.ones(2, 3), "temperature": torch.tensor([1.0, -1.0])}, ValueError, "temperature"),
        ({"logits": torch.ones(2, 3), "temperature": torch.ones(3)}, ValueError, "one entry per row"),
        ({"logits": torch.ones(2, 3), "labels": torch.tensor([0, 3])}, ValueError, "outside"),
        ({"logits": torch.ones(2, 3), "labels": torch.tensor([0, -5])}, ValueError, "outside"),
        ({"logits": torch.ones(2, 3), "labels": torch.tensor([0])}, ValueError, "one entry per row"),
        ({"logits": torch.ones(2, 3), "labels": torch.tensor([0.0, 1.0])}, TypeError, "integer"),
        ({"logits": torch.ones(2, 3), "backend": "tpu"}, ValueError, "backend"),
        ({"logits": torch.ones(2, 3), "histogram": torch.zeros(3, 4, dtype=torch.long)}, ValueError, "labels"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, err, match):
    with pytest.raises(err, match=match):
        mllmcal.token_stats(**kwargs)


def test_unavailable_backend_names_what_is_missing():
    with pytest.raises(RuntimeError, match="cuda"):
        mllmcal.token_stats(torch.ones(2, 3), backend="cuda")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("MLLMCAL_BACKEND", "torch")
    assert mllmcal.token_stats(torch.ones(2, 3)).backend == "torch"


def test_fp64_goes_to_torch_backend():
    s = mllmcal.token_stats(torch.randn(3, 5, dtype=torch.float64))
    assert s.backend == "torch"


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    v=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(HOSTILE_KINDS),
    dtype=st.sampled_from(DTYPES),
    t=st.floats(0.05, 20.0),
)
def test_property_random_inputs_match_reference(n, v, seed, kind, dtype, t):
    x = make_logits(n, v, dtype, kind, seed=seed)
    y = make_labels(n, v, seed=seed)
    for backend in CPU_BACKENDS:
        hist = torch.zeros(3, 10, dtype=torch.long)
        s = mllmcal.token_stats(x, y, temperature=t, backend=backend, histogram=hist)
        assert_matches_reference(s, x, y, t, hist=hist)


def test_histogram_does_not_depend_on_row_split():
    x = make_logits(64, 97, torch.float32, "masked", seed=2)
    y = make_labels(64, 97, seed=2, ignore_frac=0.1)
    for backend in CPU_BACKENDS:
        whole = torch.zeros(3, 15, dtype=torch.long)
        mllmcal.token_stats(x, y, backend=backend, histogram=whole)
        parts = torch.zeros(3, 15, dtype=torch.long)
        for lo, hi in [(0, 5), (5, 40), (40, 41), (41, 64)]:
            mllmcal.token_stats(x[lo:hi], y[lo:hi], backend=backend, histogram=parts)
        assert torch.equal(whole, parts)
        assert whole[0].sum() == (y != -100).sum()
