"""token_stats on the CPU backends (torch composite and the C++ kernel) vs the oracle."""

import pytest
import torch
from helpers import assert_matches_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import mllmcal
from mllmcal import ops
from mllmcal._backends import registry
from mllmcal.reference import HOSTILE_KINDS, make_labels, make_logits

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
        # Right element count, wrong pairing of rows and labels: refused by shape.
        ({"logits": torch.ones(2, 3, 5), "labels": torch.zeros(3, 2, dtype=torch.long)}, ValueError, "leading shape"),
        ({"logits": torch.ones(2, 3, 5), "labels": torch.zeros(6, dtype=torch.long)}, ValueError, "leading shape"),
        # Positive and finite as a double, but 0 / subnormal / inf once cast to fp32.
        ({"logits": torch.ones(2, 3), "temperature": 1e-50}, ValueError, "zero or subnormal in fp32"),
        ({"logits": torch.ones(2, 3), "temperature": 1e-40}, ValueError, "zero or subnormal in fp32"),
        ({"logits": torch.ones(2, 3), "temperature": 1e39}, ValueError, "infinite in fp32"),
        ({"logits": torch.ones(2, 3), "temperature": torch.tensor([1.0, 1e39], dtype=torch.float64)}, ValueError, "fp32"),
        ({"logits": torch.ones(2, 3), "temperature": torch.tensor([1.0, 1e-42])}, ValueError, "fp32"),
        ({"logits": torch.ones(3, 4), "scaled_out": torch.ones(1, 4).expand(3, 4)}, ValueError, "overlap"),
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


def test_env_var_naming_a_backend_that_cannot_take_the_device_falls_back_and_says_so(monkeypatch):
    monkeypatch.setenv("MLLMCAL_BACKEND", "cuda")  # no CUDA tensor here: cannot serve it
    monkeypatch.setattr(registry, "_env_warned", set())
    x = make_logits(3, 17, torch.float32, "normal", seed=4)
    with pytest.warns(RuntimeWarning, match="MLLMCAL_BACKEND='cuda' cannot serve"):
        s = mllmcal.token_stats(x)
    assert s.backend == ops.resolve_backend("auto", x.device, x.dtype) != "cuda"
    assert_matches_reference(s, x, None, 1.0)
    # An explicit backend argument is not a preference: it stays an error.
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        mllmcal.token_stats(x, backend="cuda")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_and_overlapping_rows(backend, dtype):
    """docs/design.md: any strides along rows. Stride 0 (expand) and overlapping windows (unfold)
    are read as they are, with no copy and no error."""
    row = make_logits(1, 301, dtype, "masked", seed=21)
    rep = row.expand(5, 301)  # stride (0, 1)
    assert rep.stride(0) == 0
    y = make_labels(5, 301, seed=21)
    s = mllmcal.token_stats(rep, y, temperature=1.3, backend=backend)
    assert_matches_reference(s, rep.contiguous(), y, 1.3)
    flat = make_logits(1, 400, dtype, "normal", seed=22).reshape(400)
    win = flat.unfold(0, 97, 30)  # [11, 97] windows 30 apart: rows overlap
    assert win.stride() == (30, 1)
    t = torch.linspace(0.5, 2.0, win.shape[0])
    hist = torch.zeros(3, 7, dtype=torch.long)
    yw = make_labels(win.shape[0], 97, seed=22)
    s = mllmcal.token_stats(win, yw, temperature=t, backend=backend, histogram=hist)
    assert_matches_reference(s, win.contiguous(), yw, t, hist=hist)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unchecked_labels_outside_the_vocabulary_are_ignored_not_read(backend):
    x = make_logits(4, 9, torch.float32, "normal", seed=6)
    y = torch.tensor([1, 9, -7, 2])
    hist = torch.zeros(3, 5, dtype=torch.long)
    s = mllmcal.token_stats(x, y, backend=backend, validate=False, histogram=hist)
    assert torch.isnan(s.label_logprob[1:3]).all() and not s.correct[1:3].any()
    assert torch.isfinite(s.label_logprob[[0, 3]]).all() and int(hist[0].sum()) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_statistics_carry_no_gradient_on_any_backend(backend):
    x = torch.randn(3, 11, requires_grad=True)
    s = mllmcal.token_stats(x * 2.0, torch.tensor([0, 4, -100]), backend=backend)
    for name, t in s.as_dict().items():
        assert not t.requires_grad, name
    # The same values as without grad tracking; x itself is untouched.
    ref = mllmcal.token_stats((x * 2.0).detach(), torch.tensor([0, 4, -100]), backend=backend)
    torch.testing.assert_close(s.confidence, ref.confidence, rtol=0, atol=0)


def test_token_stats_is_a_registered_torch_op_with_a_fake_implementation():
    x = make_logits(6, 33, torch.float32, "masked", seed=8)
    y = make_labels(6, 33, seed=8)
    out = torch.empty_like(x)
    hist = torch.zeros(3, 5, dtype=torch.long)
    torch.library.opcheck(
        torch.ops.mllmcal.token_stats.default, (x, y, 1.5, None, out, hist, -100, "torch"),
        test_utils=("test_schema", "test_faketensor"),
    )
    conf = torch.rand(7)
    torch.library.opcheck(
        torch.ops.mllmcal.histogram_add.default,
        (hist, conf, conf > 0.5, torch.ones(7, dtype=torch.bool)),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_decode_step_traces_through_the_op(compile_backend):
    """torch.compile(fullgraph=True) of a decode-step-like function that calls
    mllmcal.token_stats (with the histogram update) and uses its results."""
    torch._dynamo.reset()

    def step(logits, labels, hist):
        s = mllmcal.token_stats(logits, labels, temperature=1.7, histogram=hist, validate=False)
        tok = torch.argmax(logits, dim=-1)
        # The histogram update op on its own as well, fed from another source of confidences.
        ops.histogram_add_(hist, s.confidence.flip(0), s.correct, labels != -100)
        return s.confidence * 2.0, s.label_logprob, tok, s.prediction

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    for seed in (1, 2):  # the second call reuses the compiled graph
        x = make_logits(5, 129, torch.float32, "masked", seed=seed)
        y = make_labels(5, 129, seed=seed)
        h_eager, h_comp = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
        want = step(x, y, h_eager)
        got = compiled(x, y, h_comp)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(h_comp, h_eager) and int(h_comp[0].sum()) == 2 * int((y != -100).sum())


def test_env_var_policy_is_the_same_for_the_temperature_fit(monkeypatch):
    """One MLLMCAL_BACKEND policy for every op: the fit falls back with the same warning."""
    monkeypatch.setenv("MLLMCAL_BACKEND", "cuda")
    monkeypatch.setattr(registry, "_env_warned", set())
    x = make_logits(4, 19, torch.float32, "masked", seed=5)
    y = make_labels(4, 19, seed=5, ignore_frac=0.0)
    betas = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="MLLMCAL_BACKEND='cuda' cannot serve"):
        out, status = ops.temperature_fit_rows(x, y, betas)
    want, want_status = ops.temperature_fit_rows(x, y, betas, backend="torch")
    assert torch.equal(status, want_status)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.temperature_fit_rows(x, y, betas, backend="cuda")


def test_unavailable_reason_is_public_and_names_what_is_missing():
    assert mllmcal.ops.unavailable_reason("torch", "cpu") is None
    assert "needs CUDA tensors" in registry.unavailable_reason("cuda", "cpu", "temperature_fit")
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.unavailable_reason("tpu", "cpu")


def test_temperature_fit_is_a_registered_torch_op_with_a_fake_implementation():
    x = make_logits(6, 33, torch.float32, "masked", seed=9)
    y = make_labels(6, 33, seed=9)
    torch.library.opcheck(
        torch.ops.mllmcal.temperature_fit.default,
        (x, y, torch.tensor([0.5, 1.0, 4.0]), -100, "torch"),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_fit_step_traces_through_the_op(compile_backend):
    """torch.compile(fullgraph=True) holds the temperature-fit op like token_stats."""
    torch._dynamo.reset()
    betas = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)

    def step(logits, labels):
        out, status = ops.temperature_fit_rows(logits, labels, betas)
        return out.sum(0), (status == 1).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    for seed in (1, 2):
        x = make_logits(7, 65, torch.float32, "masked", seed=seed)
        y = make_labels(7, 65, seed=seed)
        for a, b in zip(compiled(x, y), step(x, y), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("n", [1, 64, 65, 200])
@pytest.mark.parametrize("validate", [True, False])
def test_label_checks_agree_on_both_sides_of_the_few_rows_threshold(n, validate):
    """Up to 64 CPU rows labels are checked in Python, above by tensor ops: the same labels
    give the same error (validate) or the same ignored rows (validate=False), and the
    caller's labels are never modified."""
    from mllmcal._checks import check_labels

    g = torch.Generator().manual_seed(n)
    y = torch.randint(-3, 12, (n,), generator=g)
    y[0] = -100
    y_before = y.clone()
    bad = ((y < 0) | (y >= 9)) & (y != -100)
    if validate:
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            with pytest.raises(ValueError, match=f"label {int(y[first])} at row {first} "):
                check_labels(y, (n,), n, 9, torch.device("cpu"), -100, True)
        else:
            assert torch.equal(check_labels(y, (n,), n, 9, torch.device("cpu"), -100, True), y)
    else:
        got = check_labels(y, (n,), n, 9, torch.device("cpu"), -100, False)
        assert torch.equal(got, torch.where(bad, torch.full_like(y, -100), y))
    assert torch.equal(y, y_before)
