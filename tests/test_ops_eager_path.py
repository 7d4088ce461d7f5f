"""token_stats' eager CPU path: plain CPU tensors go to the C++ kernel without the
dispatcher. It must give what the registered op gives (and the float64 oracle), and every
caller that can observe the op -- modes, subclasses, fake and meta tensors, functorch,
the profiler, torch.compile, in-place outputs -- must still get the op. Each of those
tests fails if the bypass is taken where it must not be."""

import re

import pytest
import torch
from helpers import assert_matches_reference
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mllmcal
from mllmcal import ops
from mllmcal.reference import HOSTILE_KINDS, make_labels, make_logits

pytestmark = pytest.mark.skipif(
    "cpu" not in mllmcal.available_backends("cpu"), reason="mllmcal._C is not built"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP = "mllmcal.token_stats.default"


@pytest.fixture
def op_calls(monkeypatch):
    """The backend names of the registered op's calls made by token_stats."""
    calls = []
    real = ops._token_stats_op

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ops, "_token_stats_op", spy)
    monkeypatch.delenv("MLLMCAL_BACKEND", raising=False)
    return calls


def via_op(x, y, t, backend="cpu"):
    """The op route's result for the same call."""
    fstats, pred, flags = torch.ops.mllmcal.token_stats.default(x, y, t, None, None, None, -100,
                                                                 backend)
    return ops.TokenStats.from_kernel(fstats, pred, flags, (x.shape[0],), y is not None, backend)


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class FunctionRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class Sub(torch.Tensor):
    """A plain tensor subclass: __torch_function__ runs for it, so it must see the op."""


# ----------------------------------------------------------------- the bypass, when taken


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
@pytest.mark.parametrize("n", [1, 3, 8, 64])
def test_plain_call_skips_the_op_and_equals_it_and_the_reference(op_calls, dtype, kind, n):
    v = 1031 if n > 8 else 151936 // (8 if dtype == torch.float32 else 16) + 3
    x = make_logits(n, v, dtype, kind, seed=n * 7 + len(kind))
    y = make_labels(n, v, seed=n)  # with ignore_index rows
    for labels in (y, None):
        s = mllmcal.token_stats(x, labels, temperature=0.7)
        assert op_calls == [] and s.backend == "cpu"
        assert_matches_reference(s, x, labels, 0.7)
        want = via_op(x, labels, 0.7)
        for name in ops.TokenStats.FIELDS:
            a, b = getattr(s, name), getattr(want, name)
            if b is None:
                assert a is None, name
                continue
            assert a.dtype == b.dtype and a.shape == b.shape and not a.requires_grad, name
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name
            assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(s.flags, want.flags)


def test_fields_are_read_once_and_stay_views_of_one_result(op_calls):
    x = make_logits(5, 300, torch.float32, "normal", seed=1)
    s = mllmcal.token_stats(x, torch.tensor([0, 1, -100, 3, 299]))
    assert s.confidence is s.confidence and s.prediction is s.prediction
    assert s.prediction.dtype == torch.int64 and s.valid.dtype == torch.bool
    assert s.flags.dtype == torch.uint8 and s.flags.shape == (5,)
    assert set(s.as_dict()) == set(ops.TokenStats.FIELDS)
    u = mllmcal.token_stats(x)
    assert u.label_logprob is None and u.brier is None and u.correct is None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        s.nope  # noqa: B018
    assert op_calls == []


def test_gradients_and_inference_mode_take_the_bypass_without_grad(op_calls):
    x = torch.randn(3, 11, requires_grad=True)
    s = mllmcal.token_stats(x * 2.0, torch.tensor([0, 4, -100]))
    assert all(not t.requires_grad for t in s.as_dict().values())
    with torch.inference_mode():
        r = mllmcal.token_stats(x.detach() * 2.0, torch.tensor([0, 4, -100]))
    torch.testing.assert_close(r.confidence, s.confidence, rtol=0, atol=0)
    assert op_calls == []


def test_environment_variable_is_read_on_every_call(op_calls, monkeypatch):
    x = make_logits(2, 40, torch.float32, "normal", seed=2)
    assert mllmcal.token_stats(x).backend == "cpu"
    monkeypatch.setenv("MLLMCAL_BACKEND", "torch")
    assert mllmcal.token_stats(x).backend == "torch" and op_calls == ["torch"]
    monkeypatch.setenv("MLLMCAL_BACKEND", "cpu")
    assert mllmcal.token_stats(x).backend == "cpu" and op_calls == ["torch"]
    monkeypatch.delenv("MLLMCAL_BACKEND")
    assert mllmcal.token_stats(x, backend="torch").backend == "torch"
    assert mllmcal.token_stats(x).backend == "cpu" and op_calls == ["torch", "torch"]


def test_errors_are_those_of_the_op_route(op_calls):
    x = make_logits(3, 9, torch.float32, "normal", seed=3)
    with pytest.raises(ValueError, match="label 9 at row 1 is outside"):
        mllmcal.token_stats(x, torch.tensor([0, 9, -100]))
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        mllmcal.token_stats(x, temperature=float("nan"))
    with pytest.raises(ValueError, match="zero or subnormal in fp32"):
        mllmcal.token_stats(x, temperature=1e-45)
    with pytest.raises(ValueError, match="backend must be one of"):
        mllmcal.token_stats(x, backend="tpu")
    # Unchecked labels outside the vocabulary are ignored (by the op route's masking).
    s = mllmcal.token_stats(x, torch.tensor([0, 9, -7]), validate=False)
    assert torch.isnan(s.label_logprob[1:]).all() and op_calls == ["cpu"]


@pytest.mark.parametrize("t", [1.0, 3.4028234663852886e38, 1.1754943508222875e-38, 1e-38, 3.4028235e38])
def test_temperatures_at_the_fp32_edges_match_the_op(t):
    x = make_logits(2, 50, torch.float32, "normal", seed=4)
    try:
        want = via_op(x, None, ops.check_scalar_temperature(t))
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            mllmcal.token_stats(x, temperature=t)
        return
    s = mllmcal.token_stats(x, temperature=t)
    assert torch.equal(s.confidence.nan_to_num(), want.confidence.nan_to_num())


# ----------------------------------------------------------------- every case that takes the op


def test_dispatch_mode_sees_the_op(op_calls):
    x = make_logits(2, 30, torch.float32, "normal", seed=5)
    with Recorder() as rec:
        s = mllmcal.token_stats(x, torch.tensor([1, 2]))
    assert OP in rec.seen and op_calls == ["cpu"]
    assert_matches_reference(s, x, torch.tensor([1, 2]))


def test_function_mode_sees_the_op(op_calls):
    x = make_logits(2, 30, torch.float32, "normal", seed=6)
    with FunctionRecorder() as rec:
        mllmcal.token_stats(x)
    assert OP in rec.seen and op_calls == ["cpu"]
    with torch.device("cpu"):  # set_default_device is a function mode too
        mllmcal.token_stats(x)
    assert op_calls == ["cpu", "cpu"]


def test_flop_counter_mode_takes_the_op(op_calls):
    from torch.utils.flop_counter import FlopCounterMode

    x = make_logits(2, 30, torch.float32, "normal", seed=7)
    with FlopCounterMode(display=False):
        s = mllmcal.token_stats(x)
    assert op_calls == ["cpu"]
    assert_matches_reference(s, x)


def test_fake_and_meta_tensors_take_the_op(op_calls):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(make_logits(4, 30, torch.float32, "normal", seed=8))
        s = mllmcal.token_stats(fake)
        assert s.confidence.shape == (4,) and s.prediction.dtype == torch.int64
    m = mllmcal.token_stats(torch.empty(3, 30, device="meta"))
    assert m.entropy.shape == (3,) and m.entropy.device.type == "meta"
    assert len(op_calls) == 2


def test_tensor_subclass_takes_the_op(op_calls):
    x = make_logits(3, 40, torch.float32, "masked", seed=9)
    y = make_labels(3, 40, seed=9)
    s = mllmcal.token_stats(x.as_subclass(Sub), y.as_subclass(Sub))
    assert op_calls == ["cpu"]
    assert_matches_reference(s, x, y)
    mllmcal.token_stats(x, y.as_subclass(Sub))  # a subclass of labels alone as well
    assert op_calls == ["cpu", "cpu"]


def test_functorch_transform_takes_the_op(op_calls):
    # The op has no batching rule: the op route says so (the bypass would read a
    # batched tensor's pointer instead).
    with pytest.raises(RuntimeError, match="Batching rule not implemented for mllmcal::token_stats"):
        torch.vmap(lambda t: mllmcal.token_stats(t).confidence)(torch.randn(4, 3, 10))


def test_jit_trace_records_the_op(op_calls):
    x = make_logits(3, 50, torch.float32, "normal", seed=14)
    traced = torch.jit.trace(lambda t: mllmcal.token_stats(t).confidence, (x,), check_trace=False)
    assert "mllmcal::token_stats" in str(traced.graph) and op_calls == ["cpu"]
    other = make_logits(3, 50, torch.float32, "peaked", seed=15)
    torch.testing.assert_close(traced(other), mllmcal.token_stats(other).confidence)


def test_profiler_names_the_op(op_calls):
    x = make_logits(2, 30, torch.float32, "normal", seed=10)
    with torch.profiler.profile() as prof:
        mllmcal.token_stats(x)
    assert any(e.name == "mllmcal::token_stats" for e in prof.events())
    assert op_calls == ["cpu"]


def test_compiled_call_has_the_op_in_its_graph():
    torch._dynamo.reset()
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    def f(x, y):
        s = mllmcal.token_stats(x, y, temperature=1.5)
        return s.confidence, s.prediction, s.label_logprob

    x = make_logits(3, 77, torch.float32, "normal", seed=11)
    y = make_labels(3, 77, seed=11)
    got = torch.compile(f, fullgraph=True, backend=backend)(x, y)
    assert torch.ops.mllmcal.token_stats.default in targets
    for a, b in zip(got, f(x, y), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_in_place_outputs_take_the_op_and_bump_versions(op_calls):
    x = make_logits(3, 20, torch.float32, "normal", seed=12)
    y = make_labels(3, 20, seed=12, ignore_frac=0.0)
    out = torch.empty_like(x)
    hist = torch.zeros(3, 5, dtype=torch.long)
    v_out, v_hist = out._version, hist._version
    mllmcal.token_stats(x, y, scaled_out=out)
    mllmcal.token_stats(x, y, histogram=hist)
    assert out._version > v_out and hist._version > v_hist
    assert op_calls == ["cpu", "cpu"] and int(hist[0].sum()) == 3


@pytest.mark.parametrize("case", ["tensor_temperature", "int32_labels", "strided_labels",
                                  "many_labelled_rows", "strided_vocab", "int_temperature",
                                  "3d", "fp64"])
def test_other_inputs_take_the_op_and_stay_right(op_calls, case):
    x = make_logits(70, 33, torch.float32, "normal", seed=13)
    y = make_labels(70, 33, seed=13)
    t = 1.0
    if case == "tensor_temperature":
        t = torch.full((70,), 1.3)
    elif case == "int32_labels":
        y = y.int()
    elif case == "strided_labels":
        y = torch.stack([y, y], 1)[:, 0]
    elif case == "strided_vocab":
        x = make_logits(33, 70, torch.float32, "normal", seed=13).T
    elif case == "int_temperature":
        t = 2
    elif case == "3d":
        x, y = x.reshape(7, 10, 33), y.reshape(7, 10)
    elif case == "fp64":
        x = x.double()
    if case != "many_labelled_rows":
        x, y = x[:8], y[:8]
        t = t[:8] if isinstance(t, torch.Tensor) else t
    s = mllmcal.token_stats(x, y, temperature=t)
    assert len(op_calls) == 1
    assert_matches_reference(s, x.reshape(-1, x.shape[-1]), y.reshape(-1).long(),
                             t if isinstance(t, torch.Tensor) else float(t))
