"""The runner-independent part of the vLLM integration (no vLLM needed): configuration,
records, feedback parsing and its effect on the calibration state and temperature."""

from __future__ import annotations

import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import mllmcal
from mllmcal.integrations.vllm import feedback
from mllmcal.integrations.vllm.common import requested
from mllmcal.integrations.vllm.config import Config
from mllmcal.integrations.vllm.feedback_scorer import parse_feedback
from mllmcal.integrations.vllm.request import Request
from mllmcal.integrations.vllm.steps import (
    CONF,
    ENT,
    LSE,
    PRED,
    SavedLogits,
    StepStats,
    token_logprob,
)
from mllmcal.integrations.vllm.tracker import Tracker, start_drain_thread


class ManualTracker(Tracker):
    """A tracker whose tokens are committed by the test itself."""

    def _commit_ready(self, req, final):
        return None


def _params(rid=None, **kw):
    extra = {"mllmcal_id": rid} if rid is not None else {}
    extra.update(kw.pop("extra", {}))
    base = dict(max_tokens=3, temperature=0.0, extra_args=extra, ignore_eos=False,
                stop_token_ids=[], all_stop_token_ids={2}, min_tokens=0,
                repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _tracker(tmp_path, **kw):
    cfg = Config(records=str(tmp_path / "r.jsonl"), metrics=False, flush_interval=3600,
                 feedback=str(tmp_path / "fb.jsonl"), **kw)
    return ManualTracker(cfg)


def _records(tmp_path):
    p = tmp_path / "r.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _generate(tracker, rid, logits_rows, tokens, temperature=1.0, **extra):
    """Commit one token per row as the processors do: stats of ``row / T`` and the chosen
    token's log-probability."""
    req = Request(_params(rid, max_tokens=len(tokens), extra=extra), [])
    tracker.open_request(req)
    for k, (row, tok) in enumerate(zip(logits_rows, tokens, strict=True)):
        s = mllmcal.token_stats(row[None], temperature=temperature)
        step = StepStats((s.confidence, s.entropy, s.logsumexp, s.prediction))
        if req.keep_row and k == req.fb_position:
            req.fb_rows[id(step)] = row.clone()
        req.tokens.append(tok)
        lp = float(torch.log_softmax(row.double() / temperature, -1)[tok])
        tracker._commit(req, k, float(s.confidence[0]), float(s.entropy[0]), lp, step,
                        temperature)
    return req


def test_config_from_env_and_overrides(monkeypatch):
    monkeypatch.setenv("MLLMCAL_VLLM_TEMPERATURE", "1.7")
    monkeypatch.setenv("MLLMCAL_VLLM_ONLINE_TEMPERATURE", "yes")
    monkeypatch.setenv("MLLMCAL_VLLM_METRICS", "0")
    cfg = Config.from_env({"n_bins": 10})
    assert (cfg.temperature, cfg.online_temperature, cfg.metrics, cfg.n_bins) == (
        1.7, True, False, 10)
    with pytest.raises(ValueError, match="unknown mllmcal settings"):
        Config.from_env({"temprature": 2.0})
    with pytest.raises(ValueError, match="temperature"):
        Config.from_env({"temperature": 0.0})
    monkeypatch.setenv("MLLMCAL_VLLM_DISABLE", "maybe")
    with pytest.raises(ValueError, match="MLLMCAL_VLLM_DISABLE"):
        Config.from_env()


@pytest.mark.parametrize("item, match", [
    ({"correct": True}, "needs an 'id'"),
    ({"id": "a"}, "needs 'correct' or 'label'"),
    ({"id": "a", "label": -3}, "token id"),
    ({"id": "a", "label": True}, "token id"),
    ({"id": "a", "correct": "yes"}, "bool"),
])
def test_bad_feedback_is_rejected_with_the_reason(item, match):
    with pytest.raises(ValueError, match=match):
        parse_feedback(item)


def test_record_fields_and_sequence_confidence(tmp_path):
    tr = _tracker(tmp_path)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 50, generator=g) * 3
    toks = [int(rows[0].argmax()), 7, int(rows[2].argmax())]
    _generate(tr, "q", rows, toks)
    tr.drain()  # max_tokens reached: written without any end event
    (rec,) = _records(tmp_path)
    assert rec["id"] == "q" and rec["n_tokens"] == 3 and rec["finish"] == "length"
    assert rec["token_ids"] == toks
    ref = torch.log_softmax(rows.double(), -1)
    want = [float(ref[i, t]) for i, t in enumerate(toks)]
    assert rec["logprob"] == pytest.approx(want, abs=1e-6)
    assert rec["confidence"] == pytest.approx(ref.exp().amax(-1).tolist(), abs=1e-6)
    assert rec["mean_logprob"] == pytest.approx(sum(want) / 3, abs=1e-6)
    assert rec["min_prob"] == pytest.approx(math.exp(min(want)), abs=1e-6)


def test_stop_token_ends_a_request_and_null_logprob_nulls_sequence_confidence(tmp_path):
    tr = _tracker(tmp_path)
    req = Request(_params("s", max_tokens=10), [])
    tr.open_request(req)
    step = StepStats((torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.0]),
                      torch.tensor([3])))
    for k, tok in enumerate([5, 2]):  # 2 is a stop token
        req.tokens.append(tok)
        tr._commit(req, k, 0.5, 1.0, None if k == 0 else -0.7, step, 1.0)
    tr.drain()
    (rec,) = _records(tmp_path)
    assert rec["finish"] == "stop" and rec["logprob"] == [None, -0.7]
    assert rec["mean_logprob"] is None and rec["min_prob"] is None


def test_feedback_file_lines_are_applied_once_and_half_lines_wait(tmp_path):
    tr = _tracker(tmp_path, online_temperature=True)
    g = torch.Generator().manual_seed(1)
    rows = {rid: torch.randn(2, 30, generator=g) * 4 for rid in ("a", "b")}
    for rid, r in rows.items():  # greedy, 2 tokens = max_tokens: both finish
        _generate(tr, rid, r, [int(r[0].argmax()), int(r[1].argmax())], mllmcal_feedback=True)
    tr.drain()
    assert {r["id"] for r in _records(tmp_path)} == {"a", "b"}
    wrong = (int(rows["a"][0].argmax()) + 1) % 30
    fb = tmp_path / "fb.jsonl"
    fb.write_text(json.dumps({"id": "a", "label": wrong}) + "\n" + '{"id": "b", "cor')
    tr.drain()
    assert tr.n_feedback == 1 and tr.state.count == 1 and tr.state.accuracy() == 0.0
    # The online estimator saw exactly the kept row with its label.
    ref = mllmcal.OnlineTemperature(1.0)
    ref.update(rows["a"][0][None], torch.tensor([wrong]))
    assert tr.temperature == pytest.approx(ref.temperature)
    with open(fb, "a") as f:
        f.write('rect": true}\n')
    tr.drain()
    tr.drain()
    assert tr.n_feedback == 2 and tr.state.count == 2 and tr.state.accuracy() == 0.5
    assert tr.temperature == pytest.approx(ref.temperature)  # correctness alone: T stays


def test_feedback_before_the_request_ends_is_kept(tmp_path):
    tr = _tracker(tmp_path)
    feedback("late", correct=True)
    assert tr.n_feedback == 0
    tr.drain()  # "late" is unknown yet: kept, not dropped
    rows = torch.randn(1, 20)
    _generate(tr, "late", rows, [int(rows[0].argmax())])
    tr.drain()
    assert tr.n_feedback == 1 and tr.state.accuracy() == 1.0


def test_flush_ends_open_requests(tmp_path):
    tr = _tracker(tmp_path)
    req = Request(_params("open", max_tokens=None), [])
    tr.open_request(req)
    assert tr.flush() == 0
    assert tr.flush(end_active=True) == 1
    (rec,) = _records(tmp_path)
    assert rec["finish"] == "flush" and rec["n_tokens"] == 0


def test_generated_ids_are_unique():
    a, b = Request(_params()), Request(_params())
    assert a.rid != b.rid and a.rid.startswith("mllmcal-")


def test_two_finished_requests_with_one_id_are_said_once(tmp_path, caplog):
    """n > 1: the samples share the id; both get records, feedback reaches the one that
    finished last, and a warning says so once (not once per request)."""
    tr = _tracker(tmp_path)
    g = torch.Generator().manual_seed(3)
    for k in range(3):
        r = torch.randn(1, 20, generator=g)
        tok = int(r[0].argmax()) if k < 2 else (int(r[0].argmax()) + 1) % 20
        _generate(tr, "same", r, [tok], mllmcal_feedback=True)
        tr.drain()
    assert [r["id"] for r in _records(tmp_path)] == ["same"] * 3
    assert caplog.text.count("finished again while awaiting feedback") == 1
    feedback("same", correct=False)
    tr.drain()
    assert tr.n_feedback == 1 and tr.state.count == 1


def test_feedback_book_keeps_the_newest_and_is_the_one_both_integrations_use(tmp_path):
    from mllmcal.integrations._feedback import FeedbackBook

    dropped = []
    book = FeedbackBook(n_bins=5, max_pending=2, on_drop=dropped.append)
    for key in "abc":
        assert book.put(key, key.upper()) is False
    assert book.put("b", "B2") is True  # refiled as the newest
    assert book.trim() == 1 and dropped == [1]
    assert book.items() == [("c", "C"), ("b", "B2")] and book.take("a") is None
    book.score(torch.tensor([0.8, 0.3]), torch.tensor([True, False]))
    assert book.n_feedback == 2 and book.calibration()["count"] == 2
    assert isinstance(_tracker(tmp_path).scorer.book, FeedbackBook)


def test_feedback_file_truncated_rotated_or_refilled_is_read_from_its_start(tmp_path, caplog):
    from mllmcal.integrations.vllm.feedback_scorer import FeedbackFile

    path = tmp_path / "fb.jsonl"
    path.write_text(json.dumps({"id": "a", "correct": True, "pad": "x" * 50}) + "\n")
    f = FeedbackFile(str(path))
    assert [i.id for i in f.read_new()] == ["a"]
    path.write_text(json.dumps({"id": "b", "correct": True}) + "\n")  # truncated, shorter
    with caplog.at_level("WARNING", logger="mllmcal"):
        assert [i.id for i in f.read_new()] == ["b"]
    # Truncated and refilled past the old offset before the next read.
    path.write_text("".join(json.dumps({"id": f"c{k}", "correct": False}) + "\n" for k in range(4)))
    assert [i.id for i in f.read_new()] == ["c0", "c1", "c2", "c3"]
    path.rename(tmp_path / "fb.jsonl.1")  # rotated
    path.write_text(json.dumps({"id": "d", "label": 3}) + "\n")
    assert [i.id for i in f.read_new()] == ["d"]
    with open(path, "a") as fh:  # a last line without its newline waits for it
        fh.write(json.dumps({"id": "e", "correct": True}))
    assert f.read_new() == []
    with open(path, "a") as fh:
        fh.write("\n")
    assert [i.id for i in f.read_new()] == ["e"]
    assert sum("truncated or replaced" in r.message for r in caplog.records) == 1


def test_records_wait_for_their_folder_and_are_written_once(tmp_path, caplog):
    from mllmcal.integrations.vllm.records import RecordWriter

    errors = []
    path = tmp_path / "later" / "r.jsonl"
    w = RecordWriter(str(path), on_error=lambda: errors.append(1))
    with caplog.at_level("ERROR", logger="mllmcal"):
        assert not w.write({"id": "a"})
        assert not w.write({"id": "b"})
        assert not w.retry()
    assert len(errors) == 3 and w.n_queued == 2
    assert sum("cannot write records" in r.message for r in caplog.records) == 1
    path.parent.mkdir()
    assert w.retry() and w.n_queued == 0
    assert w.write({"id": "c"}) and w.retry()
    w.close()
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_channel_store_aligns_values_and_keeps_engine_requests_apart():
    from mllmcal.integrations.vllm.channel import Store

    s = Store()
    msg = {"key": "k", "sub": 1, "id": "same", "start": 0, "token_ids": [5, 6],
           "confidence": [0.5, 0.25], "entropy": [1.0, 2.0], "logprob": [-0.7, -1.4],
           "temperature": 1.0, "finish": None}
    s.put(msg)
    assert s.peek("k", 3) is None
    s.put({**msg, "start": 1, "token_ids": [6, 7], "confidence": [0.25, 0.5],
           "entropy": [2.0, 1.0], "logprob": [-1.4, -0.7], "finish": "length"})  # resent
    got = s.take("k", 3, timeout=1.0)
    assert got["token_ids"] == [5, 6, 7] and got["finish"] == "length" and got["id"] == "same"
    assert got["mean_logprob"] == pytest.approx(-2.8 / 3)
    assert got["min_prob"] == pytest.approx(math.exp(-1.4))
    assert s.peek("k", 1) is None  # taken
    s.put(msg)
    assert s.peek("k", 1) is None  # a late message for a taken key is dropped
    s.put({**msg, "key": "k2"})
    s.put({**msg, "key": "k2", "sub": 2})
    assert "error" in s.peek("k2", 2)  # n > 1: two engine requests under one key


def test_mllmcal_serve_help_and_command(tmp_path, capsys):
    from mllmcal.cli import main
    from mllmcal.integrations.vllm.serve import MIDDLEWARE, PROCESSOR, server_command

    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert PROCESSOR in out and MIDDLEWARE in out and "api-key" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out
    cmd, env = server_command("M", ["--port", "9", "--api-key", "k1", "--api-key=k2"],
                              str(tmp_path), env={})
    assert cmd[-4:] == ["--logits-processors", PROCESSOR, "--middleware", MIDDLEWARE]
    assert cmd[cmd.index("--model") + 1] == "M" and "--port" in cmd
    assert json.loads(env["MLLMCAL_SERVE_API_KEYS"]) == ["k1", "k2"]
    assert env["MLLMCAL_VLLM"] == "1" and env["MLLMCAL_VLLM_CHANNEL"].startswith(str(tmp_path))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_step_stats_of_a_token_stats_reads_its_rows_when_asked(backend):
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(3)) * 3
    x[1] = float("-inf")  # an invalid row: NaN statistics, prediction -1
    s = mllmcal.token_stats(x, temperature=1.5, backend=backend)
    want = [s.confidence.tolist(), s.entropy.tolist(), s.logsumexp.tolist(), s.prediction.tolist()]
    step = StepStats(mllmcal.token_stats(x, temperature=1.5, backend=backend), defer=True)
    assert not step.ready()
    step.launch_copy()
    assert step.ready() and step.value(CONF, 2) == want[CONF][2]
    got = step.values()
    for i in (CONF, ENT, LSE):
        assert all((math.isnan(a) and math.isnan(b)) or a == b
                   for a, b in zip(got[i], want[i], strict=True)), i
    assert got[PRED] == want[PRED] and got[PRED][1] == -1
    assert math.isnan(got[CONF][1]) and step.value(ENT, 0) == want[ENT][0]
    # Rows given as tensors, and rows appended before the copy, read alike.
    rows = StepStats((s.confidence, s.entropy, s.logsumexp, s.prediction))
    assert rows.values()[PRED] == want[PRED]
    more = StepStats(mllmcal.token_stats(x, temperature=1.5, backend=backend), defer=True)
    more.append_rows((torch.tensor([7, 8, 9]),))
    more.launch_copy()
    assert more.values()[4] == [7, 8, 9] and more.values()[PRED] == want[PRED]


def test_step_helpers_against_log_softmax():
    """StepStats.observe, SavedLogits.take and token_logprob, the per-step pieces the V1,
    V2 and SGLang processors share, against float64 log_softmax."""
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(5)) * 4
    x[2] = float("-inf")  # an invalid row: NaN statistics, prediction -1
    t = 1.7
    step = StepStats.observe(x, t)
    saved = SavedLogits.take(x, [3, 0], {3: 0, 0: 1})
    x.mul_(0.0)  # the engine scales the logits in place after the processor returns
    step.launch_copy()
    v = step.values()
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(5)) * 4
    assert torch.equal(saved.logits, x[[3, 0]]) and saved.index.tolist() == [3, 0]
    assert saved.position == {3: 0, 0: 1} and SavedLogits.take(x, [1]).position == {}
    logp = torch.log_softmax(x.double() / t, -1)
    for r in (0, 1, 3):
        conf, lse, pred = v[CONF][r], v[LSE][r], v[PRED][r]
        other = (pred + 1) % 40
        got = token_logprob(pred, pred, conf, lse, None, t)
        assert abs(got - float(logp[r, pred])) < 1e-5
        got = token_logprob(other, pred, conf, lse, float(x[r, other]), t)
        assert abs(got - float(logp[r, other])) < 1e-5
        assert token_logprob(other, pred, conf, lse, None, t) is None
        assert token_logprob(other, pred, conf, lse, math.nan, t) is None
    assert v[PRED][2] == -1 and token_logprob(-1, -1, v[CONF][2], v[LSE][2], None, t) is None
    assert token_logprob(5, 5, 0.0, 0.0, None, t) is None  # confidence 0: no log


@pytest.mark.parametrize("value, want", [("1", True), (" Yes", True), ("on", True),
                                         ("0", False), ("FALSE", False), ("off", False),
                                         ("", "config"), ("maybe", ValueError)])
def test_mllmcal_vllm_flag(monkeypatch, value, want):
    monkeypatch.setenv("MLLMCAL_VLLM", value)
    cfg = SimpleNamespace(additional_config={"mllmcal": {}})
    if want is ValueError:
        with pytest.raises(ValueError, match="MLLMCAL_VLLM must be"):
            requested(cfg)
    elif want == "config":  # blank: what the engine's config says
        assert requested(cfg) and not requested(SimpleNamespace())
    else:
        assert requested(cfg) is want and requested(SimpleNamespace()) is want


def test_drain_thread_drains_survives_errors_and_stops():
    import threading

    class Owner:
        def __init__(self) -> None:
            self.n, self.done = 0, threading.Event()

        def drain(self) -> None:
            self.n += 1
            if hasattr(os, "getpriority"):  # the drain runs at the lowest CPU priority
                self.nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            if self.n == 1:
                raise RuntimeError("a failing drain is logged and retried")
            if self.n == 3:
                self.done.set()

    owner, stop = Owner(), threading.Event()
    thread = start_drain_thread(owner, stop, 0.01, "Test")
    assert thread.daemon and thread.name == "mllmcal-test-drain"
    assert owner.done.wait(10)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    if sys.platform == "linux":
        assert owner.nice == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # caller's kept


def test_an_active_processor_calls_its_tracker_directly_and_a_subclass_still_runs(monkeypatch):
    # An active instance binds the runner's per-step methods straight to its tracker's. A
    # subclass that overrides one (a probe timing apply, say) must still run, and its
    # super().apply must reach the tracker: the binding once shadowed the override, and
    # the class's apply only passed the logits through.
    from mllmcal.integrations.vllm import common

    monkeypatch.setattr(common, "config_of", lambda cfg: SimpleNamespace(enabled=True))
    monkeypatch.setattr(common, "_claim", lambda proc, cfg: True)

    class FakeTracker:
        def __init__(self):
            self.seen = []

        def apply(self, logits, *ctx):
            self.seen.append(logits)
            return logits

        def start(self):
            pass

        def close(self):
            pass

    class Core(common.ProcessorCore):
        per_step = ("apply",)

        def __init__(self):
            self._start(SimpleNamespace(), lambda cfg: FakeTracker())

    class Probe(Core):
        calls = 0

        def apply(self, logits, *ctx):
            Probe.calls += 1
            return super().apply(logits, *ctx)

    x = torch.zeros(2, 5)
    core, probe = Core(), Probe()
    assert core.apply == core.tracker.apply  # no forwarding frame on the engine thread
    assert core.apply(x) is x and len(core.tracker.seen) == 1
    assert probe.apply(x) is x
    assert Probe.calls == 1 and len(probe.tracker.seen) == 1
