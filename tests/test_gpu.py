"""GPU tests of the ``cuda`` and ``triton`` backends against the float64 oracle.

Marked ``gpu``: they skip without a CUDA device and run on the device machine. There,
run them with the compiled Triton kernels, not the interpreter that conftest.py turns on
for the CPU suite::

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/test_gpu.py

On a CUDA machine a backend that is not available is a failure, not a skip: these tests
exist to check the kernels there. Every test runs both launch paths (one block/program
per row, and the split vocabulary with its merge) through the public ``token_stats``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, triton_interpreting

import mllmcal
from mllmcal._backends import launch, unavailable_reason
from mllmcal.reference import HOSTILE_KINDS, make_labels, make_logits

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATHS = ["rows", "split"]


def _require(backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "triton" and triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1: rerun with TRITON_INTERPRET=0 to test compiled Triton")
    why = unavailable_reason(backend, "cuda")
    if why is not None:
        pytest.fail(f"backend {backend!r} is unavailable on a CUDA machine: {why}")


@pytest.fixture
def force_path(monkeypatch):
    """``force_path(backend, path, splits=5)`` pins the launch shape of one backend."""

    def force(backend: str, path: str, splits: int = 5) -> None:
        # One planner serves both launchers, so one switch pins both.
        monkeypatch.setattr(launch, "FORCE_SPLITS", 1 if path == "rows" else splits)

    return force


def _cuda_rand_temperature(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 2 + 0.25).cuda()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 7, 50257, 131075])
def test_odd_vocab_sizes_match_reference(backend, path, dtype, v, force_path):
    _require(backend)
    force_path(backend, path)
    n = 5 if v > 10000 else 33
    x = make_logits(n, v, dtype, "normal", seed=v, device="cuda")
    y = make_labels(n, v, seed=v, device="cuda")
    s = mllmcal.token_stats(x, y, temperature=1.3, backend=backend)
    assert s.backend == backend
    assert_matches_reference(s, x, y, 1.3)
    s1 = mllmcal.token_stats(x, y, temperature=1.0, backend=backend)  # no-division variant
    assert_matches_reference(s1, x, y, 1.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hostile_inputs_match_reference(backend, path, kind, dtype, force_path):
    _require(backend)
    force_path(backend, path, splits=3)
    n, v = 12, 4099  # V not a multiple of any vector width
    x = make_logits(n, v, dtype, kind, seed=sum(map(ord, kind)), device="cuda")
    y = make_labels(n, v, seed=3, device="cuda")
    t = _cuda_rand_temperature(n, 1)
    hist = torch.zeros(3, 15, dtype=torch.long, device="cuda")
    before = hist.clone()
    s = mllmcal.token_stats(x, y, temperature=t, backend=backend, histogram=hist)
    assert_matches_reference(s, x, y, t, hist=hist, hist_before=before)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_and_strided_rows(backend, path, dtype, force_path):
    _require(backend)
    force_path(backend, path)
    # Row stride 3 * 1001 + 3 elements and a start 1 element past an allocation: every row
    # begins at a different 16-byte phase, exercising the scalar prologue and epilogue.
    base = make_logits(8 * 3, 1004, dtype, "masked", seed=5, device="cuda")
    x = base[::3, 1:1002]
    assert x.stride(1) == 1 and x.data_ptr() % 16 != 0
    y = make_labels(8, 1001, seed=5, device="cuda")
    s = mllmcal.token_stats(x, y, temperature=0.8, backend=backend)
    assert_matches_reference(s, x, y, 0.8)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_write_in_place_and_to_another_tensor(backend, path, dtype, force_path):
    _require(backend)
    force_path(backend, path)
    x = make_logits(9, 2057, dtype, "masked", seed=11, device="cuda")
    orig = x.clone()
    t = _cuda_rand_temperature(9, 2)
    s = mllmcal.token_stats(x, temperature=t, backend=backend, scaled_out=x)
    assert_matches_reference(s, orig, None, t, scaled_out=x)
    # An output whose rows sit at another 16-byte phase than the input's.
    buf = torch.empty(9 * 2057 + 1, dtype=dtype, device="cuda")
    out = buf[1:].view(9, 2057)
    y = make_labels(9, 2057, seed=4, device="cuda")
    s = mllmcal.token_stats(orig, y, temperature=0.7, backend=backend, scaled_out=out)
    assert_matches_reference(s, orig, y, 0.7, scaled_out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_histogram_is_deterministic_and_independent_of_the_launch_shape(backend, force_path):
    _require(backend)
    x = make_logits(200, 32000, torch.bfloat16, "normal", seed=7, device="cuda")
    y = make_labels(200, 32000, seed=7, ignore_frac=0.1, device="cuda")
    hists = []
    for path, splits in [("rows", 1), ("split", 3), ("split", 16), ("rows", 1)]:
        force_path(backend, path, splits)
        h = torch.zeros(3, 20, dtype=torch.long, device="cuda")
        s = mllmcal.token_stats(x, y, backend=backend, histogram=h)
        # Each launch shape's histogram is exactly the integer adds of its own confidences.
        assert_matches_reference(s, x, y, 1.0, hist=h, hist_before=torch.zeros_like(h))
        hists.append(h)
    # The same launch shape twice: bit-identical (integer atomics, order-free).
    assert torch.equal(hists[0], hists[3])
    # Another vocabulary split sums a row's fp32 terms in another order, so a confidence
    # may move by an ulp: counts and Σcorrect stay exact, Σconf agrees to ~1e-6 per row.
    for h in hists[1:3]:
        assert torch.equal(h[0], hists[0][0]) and torch.equal(h[2], hists[0][2])
        assert int((h[1] - hists[0][1]).abs().max()) <= 200 * 2**12
    # Rows split across calls add up to the same histogram as one call, exactly.
    force_path(backend, "rows", 1)
    h_parts = torch.zeros(3, 20, dtype=torch.long, device="cuda")
    for r0 in range(0, 200, 37):
        mllmcal.token_stats(x[r0:r0 + 37], y[r0:r0 + 37], backend=backend, histogram=h_parts)
    assert torch.equal(h_parts, hists[0])
    assert int(hists[0][0].sum()) == int((y != -100).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 8, 300])
def test_decode_shapes_on_the_automatic_path(backend, dtype, n):
    _require(backend)
    v = 128256
    x = make_logits(n, v, dtype, "peaked", seed=n, device="cuda")
    y = make_labels(n, v, seed=n, device="cuda")
    hist = torch.zeros(3, 15, dtype=torch.long, device="cuda")
    s = mllmcal.token_stats(x, y, backend=backend, histogram=hist)
    assert_matches_reference(s, x, y, 1.0, hist=hist, hist_before=torch.zeros_like(hist))


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_beyond_2_31_elements(backend):
    _require(backend)
    v = 131072
    n = (1 << 31) // v + 3  # the last rows start past element 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * v * 2:
        pytest.skip("not enough free device memory for a > 2**31-element tensor")
    x = torch.empty(n, v, dtype=torch.bfloat16, device="cuda").normal_(0, 3)
    y = make_labels(n, v, seed=9, device="cuda")
    s = mllmcal.token_stats(x, y, backend=backend, validate=False)
    tail = slice(n - 3, n)
    sub = mllmcal.TokenStats(**{k: val[tail] for k, val in s.as_dict().items()},
                             backend=s.backend)
    assert_matches_reference(sub, x[tail], y[tail], 1.0)
    del x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [4, 300])
def test_cuda_graph_capture_of_the_decode_step(backend, n):
    """The logits processor's use: validate=False, in-place scaled write, per-row
    temperature, histogram, all captured once and replayed on fresh logits."""
    _require(backend)
    v = 32003
    static_x = torch.empty(n, v, dtype=torch.bfloat16, device="cuda")
    static_y = torch.empty(n, dtype=torch.long, device="cuda")
    t = _cuda_rand_temperature(n, 3)
    hist = torch.zeros(3, 15, dtype=torch.long, device="cuda")

    def step():
        return mllmcal.token_stats(static_x, static_y, temperature=t, backend=backend,
                                   scaled_out=static_x, histogram=hist, validate=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: JIT, workspaces, allocator
        static_x.copy_(make_logits(n, v, torch.bfloat16, "masked", seed=0, device="cuda"))
        static_y.copy_(make_labels(n, v, seed=0, device="cuda"))
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (1, 2, 3):
        x = make_logits(n, v, torch.bfloat16, "masked", seed=seed, device="cuda")
        y = make_labels(n, v, seed=seed, device="cuda")
        static_x.copy_(x)
        static_y.copy_(y)
        before = hist.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(out, x, y, t, scaled_out=static_x, hist=hist,
                                 hist_before=before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_without_validation_never_syncs(backend):
    """torch.cuda.set_sync_debug_mode("error") turns any host sync into an error."""
    _require(backend)
    x = make_logits(6, 4099, torch.bfloat16, "masked", seed=3, device="cuda")
    y = make_labels(6, 4099, seed=3, device="cuda")
    t = _cuda_rand_temperature(6, 4)
    hist = torch.zeros(3, 15, dtype=torch.long, device="cuda")
    out = torch.empty_like(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = mllmcal.token_stats(x, y, temperature=t, backend=backend, scaled_out=out,
                                histogram=hist, validate=False)
        s2 = mllmcal.token_stats(x, temperature=1.7, backend=backend, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_matches_reference(s, x, y, t, scaled_out=out, hist=hist)
    assert_matches_reference(s2, x, None, 1.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_processor_decode_steps_never_sync(backend, monkeypatch):
    """The processor's hot path (one fused op + one gather) under sync debug mode "error",
    in a hand-written decode loop on the GPU; results checked afterwards."""
    _require(backend)
    from mllmcal.integrations.transformers import CalibratedLogitsProcessor

    monkeypatch.setenv("MLLMCAL_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    proc = CalibratedLogitsProcessor(temperature=1.3)
    ids = torch.randint(0, 32000, (4, 3), device="cuda", generator=g)
    seen = []
    for _ in range(5):
        scores = torch.randn(4, 32000, device="cuda", generator=g) * 4
        seen.append(torch.log_softmax(scores.double() / 1.3, -1))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            proc(ids, scores)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        tok = torch.multinomial(torch.softmax(scores / 1.3, -1), 1, generator=g)
        ids = torch.cat([ids, tok], 1)
    lp = proc.token_logprobs(ids)
    exp = torch.stack(seen, 1).gather(2, ids[:, 3:, None]).squeeze(2)
    torch.testing.assert_close(lp.double(), exp, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_decode_step_on_the_gpu(backend):
    """torch.compile(fullgraph=True) through the custom op on CUDA tensors."""
    _require(backend)
    torch._dynamo.reset()

    def step(logits, labels, hist):
        s = mllmcal.token_stats(logits, labels, temperature=1.4, backend=backend,
                                histogram=hist, validate=False)
        return s.confidence, s.label_logprob, s.prediction

    compiled = torch.compile(step, fullgraph=True)
    x = make_logits(8, 32003, torch.bfloat16, "masked", seed=5, device="cuda")
    y = make_labels(8, 32003, seed=5, device="cuda")
    h1 = torch.zeros(3, 15, dtype=torch.long, device="cuda")
    h2 = torch.zeros_like(h1)
    for a, b in zip(compiled(x, y, h1), step(x, y, h2), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(h1, h2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_and_overlapping_rows(backend, dtype):
    """Stride 0 (expand) and overlapping rows (unfold, a stride that breaks 16-byte
    alignment from row to row) on the GPU kernels."""
    _require(backend)
    row = make_logits(1, 40007, dtype, "masked", seed=51, device="cuda")
    rep = row.expand(6, 40007)
    y = make_labels(6, 40007, seed=51, device="cuda")
    s = mllmcal.token_stats(rep, y, temperature=1.3, backend=backend)
    assert_matches_reference(s, rep.contiguous(), y, 1.3)
    flat = make_logits(1, 60000, dtype, "normal", seed=52, device="cuda").reshape(60000)
    win = flat.unfold(0, 33331, 2001)  # rows 2001 elements apart: every row misaligned
    yw = make_labels(win.shape[0], 33331, seed=52, device="cuda")
    s = mllmcal.token_stats(win, yw, temperature=0.7, backend=backend)
    assert_matches_reference(s, win.contiguous(), yw, 0.7)
