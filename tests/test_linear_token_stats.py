"""``mllmcal.linear_token_stats``: statistics of ``hidden @ W.T + bias`` without [N, V].

Most tests use inputs whose products and sums are exact in fp32 (small multiples of powers
of two), so the GEMM's summation order cannot matter and every route must match the
float64 oracle on the materialised logits exactly as ``token_stats`` does, ties included.
Gaussian inputs are then checked against ``token_stats`` on the materialised fp32 logits
and against the float64 oracle with a tolerance for the GEMM's own rounding. Tiles are
made small so that every test crosses several row chunks and vocabulary tiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import LargestTensor, assert_matches_reference, backends_with_triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mllmcal
from mllmcal import linear as L
from mllmcal.reference import make_labels, make_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEG = float("-inf")


BACKENDS = backends_with_triton("mllmcal.kernels.linear_token_stats")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(L, "DEFAULT_ROW_CHUNK", 8)
    monkeypatch.setattr(L, "DEFAULT_VOCAB_TILE", 48)
    monkeypatch.setattr(L, "DEFAULT_VOCAB_TILE_FP32", 48)


def exact_inputs(n, v, hd, dtype, seed=0, scale=1.0):
    """hidden in {k/4}, weight in {k/8} (|k| <= 8): every product and sum is exact in
    fp32 (and the inputs exact in bf16/fp16), so the logits do not depend on GEMM order."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-8, 9, (n, hd), generator=g).double() / 4 * scale
    w = torch.randint(-8, 9, (v, hd), generator=g).double() / 8
    return h.to(dtype), w.to(dtype)


def logits64(h, w, bias=None):
    z = h.double() @ w.double().T
    return z if bias is None else z + bias.double()


def _run(h, w, y=None, backend="cpu", **kw):
    return mllmcal.linear_token_stats(h, w, y, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v, hd", [(1, 5), (7, 17), (97, 33), (200, 16)])
def test_exact_inputs_match_reference(backend, dtype, v, hd):
    n = 19
    h, w = exact_inputs(n, v, hd, dtype, seed=v + hd)
    y = make_labels(n, v, seed=v)
    g = torch.Generator().manual_seed(v)
    for t in (1.0, 0.7, torch.rand(n, generator=g) * 2 + 0.3):
        hist = torch.zeros(3, 15, dtype=torch.long)
        s = _run(h, w, y, backend, temperature=t, histogram=hist)
        assert_matches_reference(s, logits64(h, w), y, t, hist=hist,
                                 hist_before=torch.zeros_like(hist))
    s = _run(h, w, None, backend)
    assert s.label_logprob is None and s.brier is None
    assert_matches_reference(s, logits64(h, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_with_masked_tokens_nan_and_inf_rows(backend, dtype):
    n, v, hd = 23, 150, 24
    h, w = exact_inputs(n, v, hd, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    bias = torch.randint(-4, 5, (v,), generator=g).float() / 2
    bias[torch.rand(v, generator=g) < 0.4] = NEG
    bias[:48] = NEG  # a whole vocabulary tile masked: it carries no mass
    h[2, 3] = float("nan")  # NaN row
    h[7, 0] = float("inf")  # +inf / NaN logits: invalid row
    y = make_labels(n, v, seed=5)
    y[4] = 10  # a label on a masked token: log-prob -inf
    hist = torch.zeros(3, 10, dtype=torch.long)
    s = _run(h, w, y, backend, bias=bias, histogram=hist, temperature=1.3)
    assert_matches_reference(s, logits64(h, w, bias), y, 1.3, hist=hist,
                             hist_before=torch.zeros_like(hist))
    assert not bool(s.valid[2]) and not bool(s.valid[7]) and int(s.prediction[2]) == -1
    assert s.label_logprob[4] == NEG


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_and_ties_across_tiles(backend):
    n, v, hd = 12, 100, 16
    h, w = exact_inputs(n, v, hd, torch.float32, seed=8)
    w[60:] = w[:40]  # every maximum also appears in a later tile: lowest index wins
    bias = torch.zeros(v)
    s = _run(h, w, make_labels(n, v, seed=9), backend, bias=bias)
    assert_matches_reference(s, logits64(h, w, bias), make_labels(n, v, seed=9))
    # every token masked: every row invalid, nothing in the histogram
    hist = torch.zeros(3, 15, dtype=torch.long)
    s = _run(h, w, make_labels(n, v, seed=9, ignore_frac=0), backend,
             bias=torch.full((v,), NEG), histogram=hist)
    assert not bool(s.valid.any()) and bool((s.prediction == -1).all())
    assert int(hist.sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["normal", "huge", "ties", "peaked", "nan", "posinf"])
def test_hostile_logits_through_an_identity_head(backend, kind):
    # hidden = logits, weight = I: the GEMM reproduces finite logits exactly (a NaN or
    # +inf times the zeros of I gives NaN: the row is invalid either way).
    n, v = 10, 64
    x = make_logits(n, v, torch.float32, kind, seed=11)
    w = torch.eye(v)
    y = make_labels(n, v, seed=11)
    s = _run(x, w, y, backend, temperature=0.9)
    assert_matches_reference(s, x, y, 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_head_and_leading_dims(backend):
    # A tied head: the weight is the embedding matrix and the hidden states are rows of it
    # (peaked logits, confidence near 1), in a [B, T, H] batch with ignored labels.
    b, t, v, hd = 2, 5, 90, 32
    emb, _ = exact_inputs(v, 1, hd, torch.float32, seed=12)
    ids = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(13))
    hidden = emb[ids]
    y = torch.roll(ids, -1, dims=1)
    y[:, -1] = -100
    s = _run(hidden, emb, y, backend)
    assert s.confidence.shape == (b, t) and s.prediction.shape == (b, t)
    ref_logits = logits64(hidden.reshape(-1, hd), emb)
    assert_matches_reference(s, ref_logits, y.reshape(-1))
    assert torch.isnan(s.label_logprob[:, -1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_inputs_equal_token_stats_on_fp32_logits(backend, dtype):
    n, v, hd = 21, 131, 45
    g = torch.Generator().manual_seed(14)
    h = torch.randn(n, hd, generator=g).to(dtype)
    w = (torch.randn(v, hd, generator=g) / 3).to(dtype)
    bias = torch.randn(v, generator=g)
    y = make_labels(n, v, seed=15)
    t = torch.rand(n, generator=g) + 0.5
    s = _run(h, w, y, backend, bias=bias, temperature=t)
    ref = mllmcal.token_stats(h.float() @ w.float().T + bias, y, temperature=t)
    for name, got in s.as_dict().items():
        want = ref.as_dict()[name]
        if got.dtype in (torch.bool, torch.int64):
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
    # and the float64 oracle of the exact logits, up to the fp32 GEMM's rounding
    assert_close_ref = mllmcal.reference.token_stats(logits64(h, w, bias), y, t)
    torch.testing.assert_close(s.entropy.double(), assert_close_ref.entropy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.brier.double(), assert_close_ref.brier, rtol=1e-4, atol=1e-4,
                               equal_nan=True)


def test_validation_errors():
    h, w = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(TypeError):
        mllmcal.linear_token_stats(h, w.double())
    with pytest.raises(TypeError):
        mllmcal.linear_token_stats(h.bfloat16(), w)
    with pytest.raises(ValueError):
        mllmcal.linear_token_stats(h, torch.randn(10, 7))
    with pytest.raises(ValueError):
        mllmcal.linear_token_stats(h, w, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError):
        mllmcal.linear_token_stats(h, w, temperature=0.0)
    with pytest.raises(ValueError):
        mllmcal.linear_token_stats(h, w, bias=torch.zeros(9))
    with pytest.raises(ValueError):
        mllmcal.linear_token_stats(h, w, histogram=torch.zeros(3, 5, dtype=torch.long))
    s = mllmcal.linear_token_stats(torch.randn(0, 8), w)
    assert s.confidence.shape == (0,)


def test_no_gradient_and_no_nv_buffer():
    n, v = 64, 2000
    h = torch.randn(n, 4, requires_grad=True)
    w = torch.randn(v, 4, requires_grad=True)
    with LargestTensor() as largest:
        s = mllmcal.linear_token_stats(h, w, make_labels(n, v), backend="cpu")
    assert not any(t.requires_grad for t in s.as_dict().values())
    # The largest tensor any op made is the weight's view (8000), never [N, V] logits.
    assert largest.numel <= max(v * 4, 8 * 48 * 7), largest.numel


def test_torch_compile_fullgraph():
    h, w = exact_inputs(6, 60, 16, torch.float32, seed=20)
    y = make_labels(6, 60, seed=20)

    def f(h, w, y):
        s = mllmcal.linear_token_stats(h, w, y, temperature=1.5)
        return s.entropy * 2, s.prediction, s.brier

    got = torch.compile(f, fullgraph=True, backend="eager")(h, w, y)
    want = f(h, w, y)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 12), v=st.integers(1, 120), hd=st.integers(1, 20),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       per_row_t=st.booleans(), masked=st.floats(0.0, 0.9))
def test_property_tiled_route_matches_reference(n, v, hd, dtype, seed, per_row_t, masked):
    L.DEFAULT_ROW_CHUNK, L.DEFAULT_VOCAB_TILE, L.DEFAULT_VOCAB_TILE_FP32 = 8, 48, 48  # fixtures do not run per example
    h, w = exact_inputs(n, v, hd, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    bias = torch.randint(-4, 5, (v,), generator=g).float() / 2
    bias[torch.rand(v, generator=g) < masked] = NEG
    y = make_labels(n, v, seed=seed)
    t = torch.rand(n, generator=g) * 2 + 0.2 if per_row_t else 1.0
    s = _run(h, w, y, "cpu", bias=bias, temperature=t)
    assert_matches_reference(s, logits64(h, w, bias), y, t)


def test_triton_kernel_compiles_ahead_of_time_for_sm90():
    pytest.importorskip("triton")
    res = subprocess.run(
        [sys.executable, "-c", "import json, sys; sys.path.insert(0, 'tools'); import aot; "
         "print(json.dumps(aot.linear_token_stats_report(90)))"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "TRITON_INTERPRET": "0"},
    )
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert {r["dtype"] for r in report} == {"float32", "float16", "bfloat16"}
    for r in report:
        assert r["ptx_chars"] > 0 and r["ex2"] >= 1 and r["mul_lo_s64"] >= 1, r
        if r["dtype"] != "float32":
            assert r["mma"] >= 1, r  # 16-bit tiles go through the tensor cores


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_triton_matches_cpu_route(dtype):
    n, v, hd = 300, 5000, 96
    h, w = exact_inputs(n, v, hd, dtype, seed=21)
    y = make_labels(n, v, seed=21)
    s = _run(h.cuda(), w.cuda(), y.cuda(), "triton", temperature=1.1)
    assert_matches_reference(s, logits64(h, w), y, 1.1)


def test_docstring_example_runs():
    import doctest

    result = doctest.testmod(L, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def _bf16_gemm_here() -> bool:
    from mllmcal._backends.compiled import cpu

    return "cpu" in mllmcal.available_backends("cpu") and cpu.ext.gemm_bf16_supported()


needs_bf16_gemm = pytest.mark.skipif(not _bf16_gemm_here(), reason="no AVX512-BF16 on this CPU")


@needs_bf16_gemm
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 70, 33), (4, 64, 32), (13, 131, 96), (9, 7, 0)])
def test_bf16_gemm_matches_float64_on_odd_shapes_and_strides(m, n, k):
    """mllmcal._C.gemm_bf16_nt: products exact, sums in fp32, rows at any stride >= k,
    blocks of 4 x 4 and their edges, the k % 32 tail, a bias."""
    from mllmcal._backends.compiled import cpu

    g = torch.Generator().manual_seed(m * 1000 + n + k)
    a = torch.randn(m, k + 5, generator=g).bfloat16()[:, :k]  # row stride k + 5
    b = torch.randn(n, k + 3, generator=g).bfloat16()[:, :k]
    bias = torch.randn(n, generator=g)
    c = torch.full((m, n + 2), 7.0)  # row stride n + 2; the last two columns stay
    cpu.ext.gemm_bf16_nt(a.data_ptr(), k + 5, b.data_ptr(), k + 3, c.data_ptr(), n + 2, m, n, k,
                         bias.data_ptr(), 2)
    want = a.double() @ b.double().T + bias.double()
    torch.testing.assert_close(c[:, :n].double(), want, rtol=1e-5, atol=1e-5 * max(k, 1) ** 0.5)
    assert bool((c[:, n:] == 7.0).all())
    with pytest.raises(ValueError, match="lda >= k"):
        cpu.ext.gemm_bf16_nt(a.data_ptr(), k - 1, b.data_ptr(), k, c.data_ptr(), n, m, n, k, 0, 1)


@needs_bf16_gemm
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_inputs_take_the_bf16_gemm_and_match_the_widened_route_bit_for_bit(monkeypatch, bias):
    """With exact inputs every tile logit is exact in fp32 whatever the summation order, so
    the bf16-GEMM route and the widen-then-fp32-GEMM route must agree to the last bit."""
    n, v, hd = 23, 150, 40
    h, w = exact_inputs(n, v, hd, torch.bfloat16, seed=21)
    b = (torch.arange(v, dtype=torch.float32) % 5 - 2) / 2 if bias else None
    y = make_labels(n, v, seed=21)
    assert L.LogitTiles(h, w, None).gemm is not None  # the route under test is the one taken
    fast = _run(h, w, y, "cpu", bias=b)
    monkeypatch.setattr(L, "USE_BF16_GEMM", False)
    assert L.LogitTiles(h, w, None).gemm is None and L.LogitTiles(h, w, None).widen
    slow = _run(h, w, y, "cpu", bias=b)
    for name in ("logsumexp", "confidence", "entropy", "logit_mean", "logit_var",
                 "label_logprob", "brier", "prediction", "valid", "correct"):
        a, e = getattr(fast, name), getattr(slow, name)
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.nan_to_num(), e.nan_to_num()), name
    assert_matches_reference(fast, logits64(h, w, b), y)
