"""Unit tests of mllmcal's processor against the installed vLLM's interface classes.

Run with .venv-vllm's pytest by tests/test_integration_vllm.py (the file name keeps the
main venv's pytest, which has no vLLM, from collecting it).

Model Runner V2 needs Triton on the device, which the CPU build here lacks, so the V2
path is driven by a small stand-in for the runner: it owns request slots, the committed
tokens (``all_token_ids``/``total_len`` as the device state V2 shares) and calls the
processor exactly where V2 does: ``add_request`` for new requests (before their tokens are
written over a reused slot), then per step ``apply(logits, LogitsContext)`` with rows in a
new order, then sampling, then vLLM's in-place temperature scaling of the same logits.
The V1 part checks the persistent-batch bookkeeping (swaps, one-way moves, requests taken
out of the batch and put back) with hand-built ``BatchUpdate``s.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcessor,
    build_custom_logits_processors,
)

import mllmcal
from mllmcal.integrations.vllm import (
    CalibratedLogitsProcessor,
    V1CalibratedLogitsProcessor,
    V2CalibratedLogitsProcessor,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
FQCN = "mllmcal.integrations.vllm:CalibratedLogitsProcessor"
V = 97
MAX_LEN = 64
MAX_REQS = 8


def _config(tmp_path, **kw):
    cfg = {"records": str(tmp_path / "records.jsonl"), "metrics": False,
           "flush_interval": 3600.0, **kw}
    return SimpleNamespace(additional_config={"mllmcal": cfg})


def _records(tmp_path) -> dict[str, dict]:
    path = tmp_path / "records.jsonl"
    if not path.exists():
        return {}
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


class FakeV2Runner:
    """The parts of Model Runner V2 a logits processor can observe."""

    def __init__(self, proc_factory, seed=0):
        self.all_token_ids = SimpleNamespace(gpu=torch.full((MAX_REQS, MAX_LEN), -7,
                                                            dtype=torch.int32))
        self.total_len = SimpleNamespace(gpu=torch.zeros(MAX_REQS, dtype=torch.int32))
        self.prompt_len = SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32))
        self.prefill_len = SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32))
        req_states = SimpleNamespace(
            device=torch.device("cpu"), max_num_reqs=MAX_REQS, vocab_size=V,
            all_token_ids=self.all_token_ids, prompt_len=self.prompt_len,
            prefill_len=self.prefill_len, total_len=self.total_len)
        self.proc = proc_factory(req_states)
        self.gen = torch.Generator().manual_seed(seed)
        self.reqs: dict[int, dict] = {}      # slot -> request being generated
        self.expected: dict[str, dict] = {}  # id -> what the record must say

    def add(self, slot, rid, prompt_len, max_tokens, temperature=0.0, chunk=None, **extra):
        assert slot not in self.reqs
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                extra_args={"mllmcal_id": rid, **extra})
        # V2 calls the sampler's add_request before it applies the staged writes of the
        # new request's tokens: the previous occupant's tokens are still in place.
        assert self.proc.add_request(slot, params) is True
        prompt = torch.randint(4, V, (prompt_len,), generator=self.gen, dtype=torch.int32)
        self.all_token_ids.gpu[slot, :prompt_len] = prompt
        self.all_token_ids.gpu[slot, prompt_len:] = -7
        self.prompt_len.np[slot] = self.prefill_len.np[slot] = prompt_len
        self.total_len.gpu[slot] = prompt_len
        self.reqs[slot] = {"id": rid, "max_tokens": max_tokens, "T": temperature,
                           "chunk": chunk, "computed": 0, "n_out": 0}
        self.expected[rid] = {"token_ids": [], "logprob": [], "confidence": [], "entropy": []}

    def step(self, order=None):
        slots = list(self.reqs) if order is None else order
        rows_slot, rows_pos = [], []
        for s in slots:
            r = self.reqs[s]
            plen = int(self.prompt_len.np[s])
            if r["computed"] < plen:  # prefill, possibly in chunks
                n = plen - r["computed"] if r["chunk"] is None else min(r["chunk"],
                                                                        plen - r["computed"])
                r["computed"] += n
                rows_pos.append(r["computed"] - 1)
            else:
                rows_pos.append(int(self.total_len.gpu[s]) - 1)
            rows_slot.append(s)
        logits = torch.randn(len(slots), V, generator=self.gen) * 3
        raw = logits.clone()
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(rows_slot, dtype=torch.int32),
            idx_mapping=torch.tensor(rows_slot, dtype=torch.int32),
            idx_mapping_np=np.array(rows_slot, dtype=np.int32),
            expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
            input_ids=torch.zeros(len(slots), dtype=torch.int32),
            pos=torch.tensor(rows_pos, dtype=torch.int64),
            seq_lens_upper_bound_np=np.array(rows_pos, dtype=np.int32) + 1,
        )
        out = self.proc.apply(logits, ctx)
        assert out is logits and torch.equal(out, raw), "the processor must only observe"
        for j, s in enumerate(rows_slot):
            r = self.reqs[s]
            pos = rows_pos[j]
            if pos + 1 < int(self.prompt_len.np[s]):
                continue  # a prompt chunk: no token
            if r["T"] == 0.0:
                tok = int(raw[j].argmax())
            else:
                tok = int(torch.multinomial(torch.softmax(raw[j] / r["T"], -1), 1,
                                            generator=self.gen))
            logp = torch.log_softmax(raw[j].double(), -1)
            e = self.expected[r["id"]]
            e["token_ids"].append(tok)
            e["logprob"].append(float(logp[tok]))
            e["confidence"].append(float(logp.exp().max()))
            e["entropy"].append(float(-(logp.exp() * logp).sum()))
            self.all_token_ids.gpu[s, pos + 1] = tok
            self.total_len.gpu[s] = pos + 2
            r["n_out"] += 1
        # vLLM scales the logits by the sampling temperature in place after the processors.
        logits.div_(0.5)
        logits[:, :3] = -math.inf
        for s in list(self.reqs):
            if self.reqs[s]["n_out"] >= self.reqs[s]["max_tokens"]:
                del self.reqs[s]  # finished: V2 frees the slot, telling processors nothing


def _v2(tmp_path, **cfg):
    def make(req_states):
        (proc,) = build_custom_logits_processors(_config(tmp_path, **cfg), req_states, False,
                                                 [FQCN])
        return proc
    return make


def _assert_record(rec, exp, exact=True):
    assert rec["token_ids"] == exp["token_ids"]
    assert rec["n_tokens"] == len(exp["token_ids"])
    np.testing.assert_allclose(rec["confidence"], exp["confidence"], atol=1e-5)
    np.testing.assert_allclose(rec["entropy"], exp["entropy"], atol=1e-4)
    if exact:
        np.testing.assert_allclose(rec["logprob"], exp["logprob"], atol=1e-5)


def test_one_name_passes_both_loaders_and_builds_one_class_per_interface(tmp_path):
    # The loading name passes both loaders' checks; what it builds implements one each.
    assert issubclass(CalibratedLogitsProcessor, LogitsProcessor)
    assert issubclass(CalibratedLogitsProcessor, V1LogitsProcessor)
    assert issubclass(V2CalibratedLogitsProcessor, LogitsProcessor)
    assert not issubclass(V2CalibratedLogitsProcessor, V1LogitsProcessor)
    assert issubclass(V1CalibratedLogitsProcessor, V1LogitsProcessor)
    assert not issubclass(V1CalibratedLogitsProcessor, LogitsProcessor)
    runner = FakeV2Runner(_v2(tmp_path))
    assert type(runner.proc) is V2CalibratedLogitsProcessor and runner.proc.runner == "v2"
    v1 = CalibratedLogitsProcessor(_config(tmp_path), device=torch.device("cpu"),
                                   is_pin_memory=False)
    assert type(v1) is V1CalibratedLogitsProcessor and v1.runner == "v1"


def test_v2_rows_follow_expanded_idx_mapping_and_slots_are_reused(tmp_path):
    runner = FakeV2Runner(_v2(tmp_path))
    runner.add(5, "a", prompt_len=3, max_tokens=4)
    runner.add(2, "b", prompt_len=6, max_tokens=2)
    runner.add(7, "c", prompt_len=1, max_tokens=5, temperature=0.9, mllmcal_logprobs=True)
    orders = [[5, 2, 7], [7, 5, 2], [2, 7, 5]]
    for i in range(2):
        runner.step(orders[i])
    assert 2 not in runner.reqs  # "b" finished; its slot is reused with a longer prompt,
    # whose tokens overwrite the position where b's last token was
    runner.add(2, "d", prompt_len=20, max_tokens=3)
    for i in range(6):
        if runner.reqs:
            runner.step(sorted(runner.reqs, reverse=bool(i % 2)))
    runner.proc.flush(end_active=True)
    recs = _records(tmp_path)
    assert set(recs) == {"a", "b", "c", "d"}
    for rid in "abcd":
        _assert_record(recs[rid], runner.expected[rid])
    # c sampled at T = 0.9 with the opt-in: exact, including tokens that were not the argmax
    assert any(abs(lp - math.log(c)) > 1e-3
               for lp, c in zip(runner.expected["c"]["logprob"],
                                runner.expected["c"]["confidence"], strict=True))


def test_v2_prompt_chunks_are_not_tokens(tmp_path):
    runner = FakeV2Runner(_v2(tmp_path))
    runner.add(0, "long", prompt_len=25, max_tokens=3, chunk=8)  # 4 prefill steps
    runner.add(1, "short", prompt_len=2, max_tokens=6)
    while runner.reqs:
        runner.step()
    runner.proc.flush(end_active=True)
    recs = _records(tmp_path)
    _assert_record(recs["long"], runner.expected["long"])
    _assert_record(recs["short"], runner.expected["short"])
    assert recs["long"]["n_tokens"] == 3


def test_v2_sampled_without_opt_in_is_exact_only_at_the_argmax(tmp_path):
    runner = FakeV2Runner(_v2(tmp_path), seed=3)
    runner.add(4, "s", prompt_len=2, max_tokens=30, temperature=2.0)
    while runner.reqs:
        runner.step()
    runner.proc.flush(end_active=True)
    rec = _records(tmp_path)["s"]
    exp = runner.expected["s"]
    _assert_record(rec, exp, exact=False)
    nulls = 0
    for lp, lp_exp, conf in zip(rec["logprob"], exp["logprob"], exp["confidence"], strict=True):
        if lp is None:
            nulls += 1
            assert abs(lp_exp - math.log(conf)) > 1e-9  # not the argmax
        else:
            assert abs(lp - lp_exp) <= 1e-5
    assert 0 < nulls < len(rec["logprob"])


def test_v2_records_written_when_max_tokens_reached_without_flush(tmp_path):
    runner = FakeV2Runner(_v2(tmp_path))
    runner.add(3, "x", prompt_len=4, max_tokens=2)
    runner.add(6, "y", prompt_len=4, max_tokens=9)
    for _ in range(3):
        runner.step()
    runner.add(3, "z", prompt_len=2, max_tokens=2)  # gathers x's tokens on the device
    runner.proc.tracker.drain()
    recs = _records(tmp_path)
    assert set(recs) == {"x"} and recs["x"]["finish"] == "length"
    _assert_record(recs["x"], runner.expected["x"])


def test_v2_temperature_is_the_calibration_temperature(tmp_path):
    runner = FakeV2Runner(_v2(tmp_path, temperature=2.5))
    runner.add(0, "t", prompt_len=3, max_tokens=4)
    while runner.reqs:
        runner.step()
    runner.proc.flush(end_active=True)
    rec = _records(tmp_path)["t"]
    assert rec["temperature"] == 2.5
    # greedy: log p of the argmax at T = 2.5 is log(confidence at T = 2.5) < raw log p
    for lp, conf, lp_raw in zip(rec["logprob"], rec["confidence"],
                                runner.expected["t"]["logprob"], strict=True):
        assert lp == pytest.approx(math.log(conf), abs=1e-6)
        assert lp < lp_raw


@pytest.mark.parametrize("extra", [{"mllmcal_logprobs": "yes"}, {"mllmcal_id": 1.5},
                                   {"mllmcal_feedback_position": -1}, {"mllmcal_feedback": 2},
                                   {"mllmcal_apply_temperature": "on"}])
def test_bad_extra_args_are_rejected(extra):
    with pytest.raises(ValueError, match="extra_args"):
        CalibratedLogitsProcessor.validate_params(SamplingParams(extra_args=extra))
    CalibratedLogitsProcessor.validate_params(SamplingParams(extra_args={
        "mllmcal_id": "q1", "mllmcal_logprobs": 1, "mllmcal_feedback": True}))


# --------------------------------------------------------------------------- V1


def _v1(tmp_path):
    return CalibratedLogitsProcessor(_config(tmp_path), torch.device("cpu"), False)


def test_v1_moves_swaps_and_requests_put_back(tmp_path):
    proc = _v1(tmp_path)
    assert proc.runner == "v1" and proc.is_argmax_invariant() is False
    gen = torch.Generator().manual_seed(1)
    outs = {rid: [] for rid in "abc"}
    exp = {rid: [] for rid in "abc"}
    params = {rid: SamplingParams(max_tokens=6, temperature=0.0, extra_args={"mllmcal_id": rid})
              for rid in "abc"}
    order = ["a", "b", "c"]

    def step():
        logits = torch.randn(len(order), V, generator=gen) * 2
        proc.update_state(None)
        proc.apply(logits)
        for j, rid in enumerate(order):
            tok = int(logits[j].argmax())
            exp[rid].append(float(torch.log_softmax(logits[j].double(), -1)[tok]))
            outs[rid].append(tok)

    proc.update_state(BatchUpdate(3, [], [(i, params[r], [1, 2], outs[r])
                                          for i, r in enumerate(order)], []))
    step()
    proc.update_state(BatchUpdate(3, [], [], [(0, 2, MoveDirectionality.SWAP)]))
    order = ["c", "b", "a"]
    step()
    # b is not scheduled this step: removed, and a moves into its place.
    proc.update_state(BatchUpdate(2, [1], [], [(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    order = ["c", "a"]
    step()
    # b comes back (same output list) at index 0; c moves to index 2.
    proc.update_state(BatchUpdate(3, [], [(2, params["b"], [1, 2], outs["b"])],
                                  [(0, 2, MoveDirectionality.SWAP)]))
    order = ["b", "a", "c"]
    step()
    proc.flush(end_active=True)
    recs = _records(tmp_path)
    assert set(recs) == set("abc")
    for rid in "abc":
        assert recs[rid]["token_ids"] == outs[rid]
        np.testing.assert_allclose(recs[rid]["logprob"], exp[rid], atol=1e-5)
    assert recs["b"]["n_tokens"] == 3  # one record although b left the batch for a step


def test_v1_a_token_that_lands_mid_drain_is_not_given_the_prompt_chunks_row(tmp_path):
    """The drain thread runs beside the engine thread. Here it takes the queued rows (a
    prompt's first chunk, which produced nothing), and then, before it looks at the
    request's output list, the engine runs the last chunk and vLLM appends token 0. That
    token is the last chunk's: the first chunk's row must not be committed for it (the
    multiprocess engine once recorded token 0 of a chunked prompt with the confidence of
    an earlier chunk, 0.648 where vLLM's top-1 logprob gave 0.992)."""
    proc = _v1(tmp_path)
    tracker = proc.tracker
    gen = torch.Generator().manual_seed(7)
    out, exp, conf = [], [], []
    p = SamplingParams(max_tokens=3, temperature=0.0, extra_args={"mllmcal_id": "ch"})
    proc.update_state(BatchUpdate(1, [], [(0, p, list(range(40)), out)], []))

    def step(produces: bool):
        logits = torch.randn(1, V, generator=gen) * 3
        proc.update_state(None)
        proc.apply(logits)
        if produces:
            tok = int(logits[0].argmax())
            lp = torch.log_softmax(logits[0].double(), -1)
            exp.append(float(lp[tok]))
            conf.append(float(lp.max().exp()))
            out.append(tok)

    step(produces=False)  # the prompt's first chunk: vLLM discards its sampled token
    original = tracker._before_drain
    raced = []

    def before_drain_then_engine_step():
        original()
        if not raced:  # the engine thread, between the drain's two reads
            raced.append(True)
            step(produces=True)  # the last chunk: token 0

    tracker._before_drain = before_drain_then_engine_step
    tracker.drain()
    tracker._before_drain = original
    step(produces=True)
    step(produces=True)
    proc.flush(end_active=True)
    rec = _records(tmp_path)["ch"]
    assert raced and rec["token_ids"] == out and rec["finish"] == "length"
    np.testing.assert_allclose(rec["logprob"], exp, atol=1e-5)
    np.testing.assert_allclose(rec["confidence"], conf, atol=1e-5)


def test_v1_idle_engine_still_writes_opted_in_sampled_records(tmp_path):
    """The last step of the last request is followed by no update_state (an idle server):
    the drain thread alone must read the kept rows at the chosen tokens."""
    proc = _v1(tmp_path)
    gen = torch.Generator().manual_seed(5)
    out, exp, argmax = [], [], []
    p = SamplingParams(max_tokens=6, temperature=2.0,
                       extra_args={"mllmcal_id": "s", "mllmcal_logprobs": True})
    proc.update_state(BatchUpdate(1, [], [(0, p, [1, 2], out)], []))
    for i in range(6):
        if i:
            proc.update_state(None)
        logits = torch.randn(1, V, generator=gen) * 3
        raw = logits.clone()
        proc.apply(logits)
        tok = int(torch.multinomial(torch.softmax(raw[0] / 2.0, -1), 1, generator=gen))
        logits.div_(2.0)  # vLLM's in-place temperature, after the processor
        exp.append(float(torch.log_softmax(raw[0].double(), -1)[tok]))
        argmax.append(tok == int(raw[0].argmax()))
        out.append(tok)
    assert not all(argmax)
    proc.tracker.drain()
    rec = _records(tmp_path)["s"]
    assert rec["finish"] == "length" and rec["token_ids"] == out
    np.testing.assert_allclose(rec["logprob"], exp, atol=1e-5)


def test_v2_keeps_the_answer_row_for_feedback_and_scores_it(tmp_path):
    runner = FakeV2Runner(_v2(tmp_path, online_temperature=True), seed=11)
    runner.add(1, "q", prompt_len=9, max_tokens=3, chunk=4, mllmcal_feedback=True,
               mllmcal_feedback_position=1)
    raws = []
    orig_apply = runner.proc.apply

    def spy(logits, ctx):
        raws.append(logits.clone())
        return orig_apply(logits, ctx)

    runner.proc.apply = spy
    while runner.reqs:
        runner.step()
    tracker = runner.proc.tracker
    tracker.flush(end_active=True)
    # prefill chunks at 4, 8, 9 tokens, then the decode steps: output 1 came from step 4
    row = tracker.scorer.book.get("q").row
    assert row is not None and torch.equal(row, raws[3][0])
    from mllmcal.integrations.vllm import feedback

    label = (runner.expected["q"]["token_ids"][1] + 5) % V
    feedback("q", label=label)
    tracker.flush()
    assert tracker.n_feedback == 1 and tracker.state.count == 1
    ref = mllmcal.OnlineTemperature(1.0)
    ref.update(raws[3][0][None], torch.tensor([label]))
    assert tracker.temperature == pytest.approx(ref.temperature)


def test_disabled_processor_is_a_no_op(tmp_path):
    cfg = _config(tmp_path, enabled=False)
    proc = CalibratedLogitsProcessor(cfg, torch.device("cpu"), False)
    out = []
    proc.update_state(BatchUpdate(1, [], [(0, SamplingParams(max_tokens=1), [1], out)], []))
    x = torch.randn(1, V)
    assert proc.apply(x) is x
    out.append(int(x.argmax()))
    assert proc.flush(end_active=True) == 0 and not _records(tmp_path)


def test_apply_temperature_scales_only_the_requests_that_ask(tmp_path):
    """V1 and V2: rows of opted-in requests leave divided by the calibration temperature
    (after the statistics were taken from the unscaled logits); the others untouched."""
    t_cal = 2.5
    proc = CalibratedLogitsProcessor(_config(tmp_path, temperature=t_cal), torch.device("cpu"),
                                     False)
    outs = [[], []]
    ps = [SamplingParams(max_tokens=2, temperature=1.0,
                         extra_args={"mllmcal_id": "hot", "mllmcal_apply_temperature": True}),
          SamplingParams(max_tokens=2, temperature=1.0, extra_args={"mllmcal_id": "plain"})]
    proc.update_state(BatchUpdate(2, [], [(i, ps[i], [1], outs[i]) for i in range(2)], []))
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(2)) * 3
    raw = x.clone()
    assert proc.apply(x) is x
    torch.testing.assert_close(x[0], raw[0] / t_cal)
    assert torch.equal(x[1], raw[1])
    for i in range(2):
        outs[i].append(int(raw[i].argmax()))
    proc.flush(end_active=True)
    rec = _records(tmp_path)["hot"]
    want = torch.log_softmax(raw[0].double() / t_cal, -1).max()
    assert rec["logprob"][0] == pytest.approx(float(want), abs=1e-5)

    (tmp_path / "v2").mkdir()
    runner = FakeV2Runner(_v2(tmp_path / "v2", temperature=t_cal))
    runner.add(3, "hot2", prompt_len=2, max_tokens=1, mllmcal_apply_temperature=True)
    runner.add(5, "plain2", prompt_len=2, max_tokens=1)
    logits = torch.randn(2, V) * 3
    raw = logits.clone()
    ctx = LogitsContext(
        expanded_idx_mapping=torch.tensor([5, 3], dtype=torch.int32),
        idx_mapping=torch.tensor([5, 3], dtype=torch.int32),
        idx_mapping_np=np.array([5, 3], dtype=np.int32),
        expanded_local_pos=torch.zeros(2, dtype=torch.int32),
        input_ids=torch.zeros(2, dtype=torch.int32), pos=torch.tensor([1, 1]),
        seq_lens_upper_bound_np=np.array([2, 2], dtype=np.int32))
    runner.proc.apply(logits, ctx)
    assert torch.equal(logits[0], raw[0])
    torch.testing.assert_close(logits[1], raw[1] / t_cal)


def test_loaded_by_name_and_through_the_entry_point_in_both_runners():
    # Last in this file: once vLLM has seen the entry point, later loads in this process
    # may keep finding it (importlib.metadata caches), and the tests above expect one
    # processor.
    import load_checks

    load_checks.main(str(Path(__file__).resolve().parents[2] / "pyproject.toml"))
