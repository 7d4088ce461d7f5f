"""Kernel-specific cases of the C++ CPU backend (``backend="cpu"``, ``mllmcal._C``).

``tests/test_ops.py`` already runs the backend against the float64 oracle on the shared
cases; this file pins down what is particular to this kernel: both work paths (one chunk
per row, and vocabularies split across threads with merged partials), every instruction
set the CPU can run, block and chunk edges, maxima that move late, huge logits, the
fp16/bf16 conversions bit for bit, and thread-count independence of histograms.

N·V > 2^31 is argued rather than allocated (CI has no room for a 8 GiB tensor): every
element offset in csrc/cpu is formed in int64 (`i * row_stride` in run_chunk, column
indices `j0`, `c0`, `c1`, labels and argmax are int64); only the in-block index is an
int, and it is bounded by the block size (2048).
"""

import pytest
import torch
from helpers import assert_matches_reference

import mllmcal
from mllmcal import _contract as C
from mllmcal._backends import unavailable_reason
from mllmcal._backends.compiled import cpu as CPU
from mllmcal.reference import make_labels, make_logits

pytestmark = pytest.mark.skipif(
    "cpu" not in mllmcal.available_backends("cpu"), reason=f"mllmcal._C: {unavailable_reason('cpu')}"
)

ISAS = CPU.supported_isas() if unavailable_reason("cpu") is None else []


@pytest.fixture(autouse=True)
def helpers_always_wake():
    """The pool's helpers join every multi-threaded call here, so that the tests of the
    threaded paths run threads: the default policy ("auto") would leave these small calls
    to the caller alone on a machine where waking a thread is dear."""
    before = CPU.pool_policy("always")
    yield
    CPU.pool_policy(before)


def run(x, labels=None, temperature=1.0, *, scaled_out=None, hist=None, **kw):
    """Call the kernel directly (bypassing ops), returning a TokenStats-like object."""
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[0]
    t_rows = temperature.float().contiguous() if isinstance(temperature, torch.Tensor) else None
    t = 1.0 if t_rows is not None else float(temperature)
    fstats = torch.full((C.N_FSTATS, n), 123.0)  # garbage: the kernel must overwrite it
    pred = torch.full((n,), 77, dtype=torch.int64)
    flags = torch.full((n,), 255, dtype=torch.uint8)
    CPU.token_stats_into(x2, labels, t, t_rows, fstats, pred, flags, scaled_out, hist,
                          C.IGNORE_INDEX, **kw)
    valid = (flags & C.FLAG_VALID) != 0
    return mllmcal.TokenStats(
        logsumexp=fstats[C.LSE], confidence=fstats[C.CONF], prediction=pred,
        entropy=fstats[C.ENT], valid=valid, logit_mean=fstats[C.MEAN], logit_var=fstats[C.VAR],
        label_logprob=None if labels is None else fstats[C.LABEL_LOGPROB],
        correct=None if labels is None else (flags & C.FLAG_CORRECT) != 0,
        brier=None if labels is None else fstats[C.BRIER], backend="cpu",
    )


PATHS = [
    {"mode": "rows", "num_threads": 1},
    {"mode": "rows", "num_threads": 2},
    {"mode": "split", "num_threads": 2},  # automatic chunk width
    {"mode": "split", "num_threads": 2, "chunk_columns": 2048},  # chunk edge = block edge
    {"mode": "split", "num_threads": 3, "chunk_columns": 1000},  # edges inside blocks
]


def test_kernel_reports_an_instruction_set_this_cpu_supports():
    assert CPU.kernel_isa() in ISAS
    assert "generic" in ISAS


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("kind", ["normal", "masked", "nan", "peaked", "ties"])
def test_every_path_and_isa_matches_reference(isa, path, kind):
    dtype = {"normal": torch.float32, "masked": torch.bfloat16, "nan": torch.float16}.get(kind, torch.float32)
    x = make_logits(5, 9001, dtype, kind, seed=len(kind))
    y = make_labels(5, 9001, seed=4)
    t = torch.tensor([0.7, 1.0, 1.9, 0.3, 5.0])
    s = run(x, y, t, isa=isa, **path)
    assert_matches_reference(s, x, y, t)


@pytest.mark.parametrize("v", [131075, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabularies_on_both_paths(v, dtype):
    x = make_logits(2, v, dtype, "masked", seed=v)
    y = make_labels(2, v, seed=v, ignore_frac=0.0)
    for path in ({"mode": "rows"}, {"mode": "split", "num_threads": 2}):
        s = run(x, y, 1.1, **path)
        assert_matches_reference(s, x, y, 1.1)


def test_split_and_row_paths_agree_to_rounding():
    x = make_logits(3, 50001, torch.float32, "normal", seed=9)
    y = make_labels(3, 50001, seed=9, ignore_frac=0.0)
    a = run(x, y, 0.9, mode="rows")
    b = run(x, y, 0.9, mode="split", num_threads=2, chunk_columns=4096)
    assert torch.equal(a.prediction, b.prediction)
    for name in ("logsumexp", "confidence", "entropy", "logit_mean", "logit_var", "brier"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6)


def _late_max_rows(v: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(6, v, generator=g, dtype=torch.float64)
    rows[0, -1] = 40.0  # the max is the very last column
    rows[1] = torch.linspace(-50.0, 50.0, v, dtype=torch.float64)  # the max grows in every block
    rows[2, : v // 2] = float("-inf")  # the first half (several whole blocks) is masked
    rows[3, : v - 1] = float("-inf")  # only the last column is live
    rows[4, 7] = rows[4, v - 3] = 30.0  # equal maxima in the first and last chunk: 7 wins
    rows[5, 2047] = rows[5, 2048] = 30.0  # equal maxima across a block edge: 2047 wins
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS[::2], ids=["rows1", "split-auto", "split-1000"])
def test_maxima_that_move_late_or_tie_across_edges(dtype, path):
    v = 20011
    x = _late_max_rows(v).to(dtype)
    y = torch.tensor([v - 1, 5, v - 2, v - 1, 7, 2048])
    s = run(x, y, 1.0, **path)
    assert_matches_reference(s, x, y, 1.0)
    assert s.prediction.tolist()[:1] == [v - 1] and s.prediction[4] == 7 and s.prediction[5] == 2047
    assert s.prediction[3] == v - 1
    if dtype == torch.float32:  # in 16-bit the ramp's top values round to ties
        assert s.prediction[1] == v - 1


@pytest.mark.parametrize("path", PATHS[::2], ids=["rows1", "split-auto", "split-1000"])
def test_huge_logits_near_the_fp32_range(path):
    v = 6000
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(4, v, generator=g) * 2 - 1) * 3.0e38  # z − max can overflow to −inf
    x[1] = torch.randn(v, generator=g) + 1.0e30  # huge offset, ordinary spread
    x[2, 100] = 3.4e38  # one enormous logit
    x[3] = -3.0e38  # all equal and hugely negative: uniform distribution
    y = torch.tensor([0, 1, 100, v - 1])
    s = run(x, y, 1.0, **path)
    assert s.valid.all()
    assert_matches_reference(s, x, y, 1.0)
    # A temperature that pushes x / T past fp32 makes ±inf: a +inf row is invalid and an
    # all −inf row too, as in the oracle; row 1 (1e33) stays finite.
    s = run(x, y, 1e-3, **path)
    assert_matches_reference(s, x, y, 1e-3)
    assert s.valid.tolist() == [False, True, False, False]


@pytest.mark.parametrize("path", PATHS[::2], ids=["rows1", "split-auto", "split-1000"])
def test_invalid_values_in_a_late_chunk_poison_only_their_row(path):
    v = 9000
    x = make_logits(4, v, torch.float32, "normal", seed=1)
    x[0, v - 2] = float("nan")
    x[1, 8500] = float("inf")
    x[2, :] = float("-inf")
    x[3, :5000] = float("-inf")  # a whole masked chunk, then live values
    y = torch.tensor([0, 1, 2, 6000])
    hist = torch.zeros(3, 10, dtype=torch.long)
    s = run(x, y, 1.0, hist=hist, **path)
    assert s.valid.tolist() == [False, False, False, True]
    assert s.prediction[:3].tolist() == [-1, -1, -1]
    assert torch.isnan(torch.stack([s.logsumexp, s.entropy, s.brier])[:, :3]).all()
    assert hist[0].sum() == 1
    assert_matches_reference(s, x, y, 1.0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_are_exact_for_every_bit_pattern(dtype, isa):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(16, 4096).clone()
    out = torch.empty_like(x)
    run(x, None, 1.0, scaled_out=out, mode="rows", isa=isa)  # T = 1: read and write round-trip
    nan = torch.isnan(x.float())
    assert torch.equal(out.view(torch.int16)[~nan], x.view(torch.int16)[~nan])
    assert torch.isnan(out.float()[nan]).all()
    # T != 1: every fp32 quotient is rounded to the dtype exactly like torch rounds it.
    for t in (0.37, 3.0, 1e-3):
        run(x, None, t, scaled_out=out, mode="rows", isa=isa)
        expect = (x.float() / torch.tensor(t, dtype=torch.float32)).to(dtype)
        enan = torch.isnan(expect.float())
        assert torch.equal(torch.isnan(out.float()), enan)
        assert torch.equal(out.view(torch.int16)[~enan], expect.view(torch.int16)[~enan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scaled_out_in_place_on_the_split_path_keeps_the_label_logit(dtype):
    x = make_logits(2, 12000, dtype, "masked", seed=8)
    y = make_labels(2, 12000, seed=8, ignore_frac=0.0)
    orig = x.clone()
    t = torch.tensor([0.5, 2.5])
    s = run(x, y, t, scaled_out=x, mode="split", num_threads=2, chunk_columns=3000)
    assert_matches_reference(s, orig, y, t, scaled_out=x)


def test_fp32_statistics_are_tighter_than_the_shared_tolerance():
    x = make_logits(8, 32768, torch.float32, "normal", seed=21)
    y = make_labels(8, 32768, seed=21, ignore_frac=0.0)
    s = run(x, y, 1.0)
    ref = mllmcal.reference.token_stats(x, y)
    for name in ("logsumexp", "confidence", "entropy", "label_logprob"):
        torch.testing.assert_close(getattr(s, name).double(), getattr(ref, name), rtol=2e-6, atol=0)


def test_histograms_do_not_depend_on_thread_count():
    x = make_logits(64, 3001, torch.float32, "masked", seed=6)
    y = make_labels(64, 3001, seed=6)
    hists = []
    for threads in (1, 2):
        h = torch.zeros(3, 15, dtype=torch.long)
        s = run(x, y, 0.8, hist=h, num_threads=threads)
        hists.append(h)
        assert_matches_reference(s, x, y, 0.8, hist=h)
    assert torch.equal(hists[0], hists[1])
    assert hists[0][0].sum() == (y != C.IGNORE_INDEX).sum()


def test_binding_rejects_bad_structural_arguments():
    ext = CPU.ext
    x = torch.zeros(2, 3)
    f, p, fl = torch.empty(7, 2), torch.empty(2, dtype=torch.long), torch.empty(2, dtype=torch.uint8)
    common = dict(labels=0, temperature=1.0, temperature_rows=0, fstats=f.data_ptr(),
                  pred=p.data_ptr(), flags=fl.data_ptr(), scaled_out=0, stride_out=0,
                  hist=0, n_bins=0, ignore_index=-100)
    with pytest.raises(ValueError, match="dtype code"):
        ext.token_stats(x=x.data_ptr(), n=2, v=3, stride_x=3, dtype=7, **common)
    with pytest.raises(ValueError, match="stride_x"):
        ext.token_stats(x=x.data_ptr(), n=2, v=3, stride_x=-3, dtype=0, **common)
    with pytest.raises(ValueError, match="stride_out"):
        out = torch.empty(2, 3)
        ext.token_stats(x=x.data_ptr(), n=2, v=3, stride_x=3, dtype=0,
                        **{**common, "scaled_out": out.data_ptr(), "stride_out": 2})
    with pytest.raises(ValueError, match="ISA"):
        ext.token_stats(x=x.data_ptr(), n=2, v=3, stride_x=3, dtype=0, isa="sve", **common)


@pytest.mark.parametrize("policy", ["always", "auto"])
def test_split_path_is_safe_from_concurrent_python_threads(policy):
    """Calls release the GIL, so several threads may share the split pool at once. Under
    "auto" with a free wake (pinned) every call wakes the helper after its first item,
    from inside its own loop, while other callers publish and wake."""
    from concurrent.futures import ThreadPoolExecutor

    CPU.pool_policy(policy)
    CPU.pool_stats(reset=True, wake_cost_us=0.0 if policy == "auto" else -1.0)

    xs = [make_logits(1, 40000, torch.float32, "normal", seed=s) for s in range(8)]
    ys = [make_labels(1, 40000, seed=s, ignore_frac=0.0) for s in range(8)]
    expected = [run(x, y, 1.0, mode="rows") for x, y in zip(xs, ys, strict=True)]

    def split(k: int):
        return run(xs[k], ys[k], 1.0, mode="split", num_threads=2, chunk_columns=4096)

    with ThreadPoolExecutor(4) as ex:
        for _ in range(3):
            for k, got in enumerate(ex.map(split, range(8))):
                assert torch.equal(got.prediction, expected[k].prediction)
                torch.testing.assert_close(got.logsumexp, expected[k].logsumexp, rtol=1e-6, atol=0)
    st = CPU.pool_stats(reset=True)
    assert st["calls"] == 24 and st["woken"] >= 1


def _fields(s) -> list[torch.Tensor]:
    return [s.logsumexp, s.confidence, s.entropy, s.logit_mean, s.logit_var, s.label_logprob,
            s.brier, s.prediction, s.valid, s.correct]


@pytest.mark.parametrize("kw", [
    {"mode": "split", "num_threads": 2, "chunk_columns": 2048},
    {"mode": "split", "num_threads": 3},
    {"mode": "rows", "num_threads": 2},
])
def test_results_do_not_depend_on_the_wake_policy(kw):
    """Who runs an item changes nothing: items and their merge order are the plan's."""
    x = make_logits(5, 37000, torch.float32, "masked", seed=11)
    y = make_labels(5, 37000, seed=11)
    got = {}
    for policy in ("never", "always", "auto"):
        CPU.pool_policy(policy)
        got[policy] = [run(x, y, 0.7, **kw) for _ in range(3)]
    want = _fields(got["never"][0])
    for policy, results in got.items():
        for s in results:
            for a, b in zip(_fields(s), want, strict=True):
                assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(
                    a.nan_to_num(), b.nan_to_num()), policy
    assert_matches_reference(got["auto"][0], x, y, 0.7)


def test_pool_policy_is_set_read_and_checked():
    assert CPU.pool_policy("never") == "always"  # the fixture's
    assert CPU.pool_policy("") == "never"
    assert CPU.pool_policy("auto") == "never"
    with pytest.raises(ValueError, match="'auto', 'always' or 'never', got 'sometimes'"):
        CPU.pool_policy("sometimes")
    assert CPU.pool_policy("") == "auto"


def test_pool_policy_from_the_environment(monkeypatch):
    """MLLMCAL_CPU_POOL sets it where the backend loads (a serving engine's workers); a bad
    name makes the backend unavailable, saying why."""
    monkeypatch.setenv("MLLMCAL_CPU_POOL", "never")
    assert CPU.unavailable_reason() is None
    assert CPU.pool_policy("") == "never"
    monkeypatch.setenv("MLLMCAL_CPU_POOL", "sometimes")
    why = CPU.unavailable_reason()
    assert why is not None and why.startswith("MLLMCAL_CPU_POOL: ") and "got 'sometimes'" in why


def test_wake_policy_counts_and_decisions():
    """"never" publishes nothing; "always" wakes every call; "auto" wakes when the work
    outweighs the wake's cost (pinned here, so that the decision is the test's)."""
    x = make_logits(1, 65536, torch.float32, "normal", seed=3)
    split = {"mode": "split", "num_threads": 2, "chunk_columns": 2048}  # 32 items
    CPU.pool_stats(reset=True)
    CPU.pool_policy("never")
    for _ in range(5):
        run(x, **split)
    assert CPU.pool_stats(reset=True)["calls"] == 0
    CPU.pool_policy("always")
    for _ in range(5):
        run(x, **split)
    st = CPU.pool_stats(reset=True, wake_cost_us=1e6)  # then: waking costs a second
    assert st["calls"] == st["woken"] == 5  # (the helper may have run every item)
    CPU.pool_policy("auto")
    for _ in range(15):  # fewer than the probe interval (16)
        run(x, **split)
    st = CPU.pool_stats(reset=True, wake_cost_us=0.0)  # then: waking is free
    assert (st["calls"], st["woken"], st["wake_cost_us"]) == (15, 0, 1e6)
    assert st["ns_per_element"] > 0
    for _ in range(5):
        run(x, **split)
    st = CPU.pool_stats(reset=True)
    assert (st["calls"], st["woken"], st["wake_cost_us"]) == (5, 5, 0.0)
    for _ in range(3):  # nothing measured after a reset: the first call wakes, to measure
        run(x, **split)
    st = CPU.pool_stats(reset=True)
    assert st["calls"] == 3 and st["woken"] >= 1


def test_wake_policy_probes_a_skipped_wake_every_16_calls():
    x = make_logits(1, 8192, torch.float32, "normal", seed=4)
    CPU.pool_policy("auto")
    CPU.pool_stats(reset=True, wake_cost_us=1e6)
    for _ in range(40):
        run(x, mode="split", num_threads=2, chunk_columns=2048)
    st = CPU.pool_stats(reset=True)
    assert (st["calls"], st["woken"]) == (40, 2)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_split_path_works_in_a_forked_child():
    """The child of a fork has none of the parent's helper threads; it must not hang."""
    import os

    x = make_logits(1, 40000, torch.float32, "normal", seed=2)
    expected = run(x, None, 1.0, mode="split", num_threads=2).logsumexp  # parent starts helpers
    pid = os.fork()
    if pid == 0:  # child: exit code 0 only if the result matches
        try:
            got = run(x, None, 1.0, mode="split", num_threads=2).logsumexp
            os._exit(0 if torch.equal(got, expected) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_auto_backend_picks_the_cpu_kernel_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("MLLMCAL_BACKEND", raising=False)
    assert "cpu" in mllmcal.available_backends("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert mllmcal.token_stats(torch.randn(2, 5).to(dtype)).backend == "cpu"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_and_overlapping_rows_are_read_in_place(path, dtype):
    """Row stride 0 (expand) and row stride < V (unfold): rows are only read, so the
    kernel takes them as they are, on every path."""
    row = make_logits(1, 5000, dtype, "masked", seed=31)
    rep = row.expand(4, 5000)
    y = make_labels(4, 5000, seed=31)
    s = run(rep, y, 1.3, **path)
    assert_matches_reference(s, rep.contiguous(), y, 1.3)
    flat = make_logits(1, 9000, dtype, "normal", seed=32).reshape(9000)
    win = flat.unfold(0, 4097, 700)  # rows overlap by 3397 columns
    assert win.stride(0) < win.shape[1]
    t = torch.linspace(0.5, 2.0, win.shape[0])
    h = torch.zeros(3, 10, dtype=torch.long)
    yw = make_labels(win.shape[0], 4097, seed=32)
    s = run(win, yw, t, hist=h, **path)
    assert_matches_reference(s, win.contiguous(), yw, t, hist=h)


@pytest.mark.parametrize("isa", ISAS)
def test_fp32_division_by_temperature_is_exact(isa):
    # The AVX-512 build divides by T with an FMA correction instead of vdivps (exact by
    # Markstein's theorem inside the range it is used in); the scaled copy shows every z.
    g = torch.Generator().manual_seed(7)
    mant = torch.rand(64, 4096, generator=g) + 1.0
    expo = torch.randint(-64, 64, (64, 4096), generator=g).float()
    sign = torch.where(torch.rand(64, 4096, generator=g) < 0.5, -1.0, 1.0)
    x = (sign * mant * torch.exp2(expo)).float()
    x[::7, ::13] = 0.0  # zeros and out-of-range lanes send their vector to a true division
    out = torch.empty_like(x)
    for t in (0.37, 1.3, 3.0, 1e-3, 7e5, 2.0**-59):
        run(x, None, t, scaled_out=out, mode="rows", isa=isa)
        expect = x / torch.tensor(t, dtype=torch.float32)
        assert torch.equal(out.view(torch.int32), expect.view(torch.int32)), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS[::2], ids=["rows1", "split-auto", "split-1000"])
def test_nan_is_found_wherever_it_hides(dtype, path):
    # The AVX-512 max pass ignores NaN; the exp pass's sum of e finds it, and a block whose
    # max is −inf (no exp pass) is scanned. 9001 columns: the last block's tail is masked.
    v = 9001
    x = make_logits(7, v, torch.float32, "normal", seed=2)
    x[0, :] = float("-inf")
    x[0, 3000] = float("nan")  # the only non −inf value of its block and row
    x[1, v - 1] = float("nan")  # in the masked tail lanes of the last block
    x[2, 2047] = float("nan")  # before the max moves to a later block
    x[2, 4000] = 50.0
    x[3, 6144:8192] = float("-inf")  # NaN inside a masked block between live ones
    x[3, 7000] = float("nan")
    x[4, :] = float("nan")
    x[5, 100] = float("-inf")  # −inf alone keeps the row valid
    x[6, 10] = 6.0e4 if dtype == torch.float16 else 1.0e30  # every other z − max is huge
    x = x.to(dtype)
    y = make_labels(7, v, seed=2, ignore_frac=0.0)
    s = run(x, y, 1.0, **path)
    assert s.valid.tolist() == [False] * 5 + [True, True]
    assert_matches_reference(s, x, y, 1.0)


@pytest.mark.parametrize("isa", ISAS)
def test_values_far_below_the_max_and_denormal_quotients(isa):
    # The exp pass runs without its floor until a block's sum of e is not finite, then
    # with it for the rest of the chunk: every regime of z − max, and −inf before live
    # blocks. Flush-to-zero covers that pass only: x / T keeps its denormal quotients.
    v = 5000
    g = torch.Generator().manual_seed(11)
    x = torch.randn(7, v, generator=g)
    x[0, ::3] = -1.0e5  # −2.9e6 < z − max < −87: e underflows
    x[1, ::3] = -1.0e7  # z − max < −2.9e6: the rounding trick no longer gives integers
    x[2, ::5] = -3.0e38  # z − max overflows to −inf
    x[2, 7] = 3.0e38
    x[3] = torch.randn(v, generator=g) * 1e-39  # denormal logits (and quotients)
    x[4, :2048] = float("-inf")  # a masked first block, then live blocks
    x[5, 3000] = float("-inf")
    x[6, 4999] = 200.0  # the max in the masked tail of the last block
    y = make_labels(7, v, seed=11, ignore_frac=0.0)
    out = torch.empty_like(x)
    for t in (1.0, 0.01, 3.0):
        s = run(x, y, t, scaled_out=out, mode="rows", isa=isa)
        assert_matches_reference(s, x, y, t, scaled_out=out)
        assert torch.equal(out.view(torch.int32), (x / torch.tensor(t)).view(torch.int32))


def test_flush_to_zero_does_not_leak_to_the_caller():
    x = make_logits(2, 5000, torch.float32, "normal", seed=3)
    run(x, None, 1.0, mode="rows", num_threads=1)
    run(x, None, 0.5, mode="rows", num_threads=1)
    assert (torch.tensor([1e-38]) / torch.tensor([100.0])).item() != 0.0
