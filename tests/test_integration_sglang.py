"""mllmcal's SGLang processor on SGLang's real CPU engine, offline and served.

SGLang lives in its own venv (.venv-sglang, made by scripts/setup_sglang.sh). Each check
runs tests/sglang/engine_checks.py there by subprocess, once per engine start, with this
checkout's mllmcal and the test stand-in for ``sgl_kernel`` (tests/sglang/stubs) on the
subprocess's PYTHONPATH only. Without .venv-sglang the tests skip locally and FAIL under
CI=true.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from helpers import need_environment

ROOT = Path(__file__).resolve().parents[1]
VPY = ROOT / ".venv-sglang" / "bin" / "python"
SCRIPT = ROOT / "tests" / "sglang" / "engine_checks.py"
STUBS = ROOT / "tests" / "sglang" / "stubs"
TOL = 1e-5


def _run(mode: str, model: Path, tmp: Path) -> dict:
    need_environment(VPY, "setup_sglang.sh")
    out = tmp / f"{mode}.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLLMCAL_", "PROMETHEUS_", "SGLANG_", "TRITON_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(STUBS)])
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    proc = subprocess.run([str(VPY), str(SCRIPT), "--mode", mode, "--model", str(model),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        log = out.with_suffix(".server.log")
        server_log = log.read_text()[-6000:] if log.exists() else ""
        pytest.fail(f"engine_checks.py --mode {mode} exited {proc.returncode}\n--- stdout\n"
                    f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}\n"
                    f"--- server log\n{server_log}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from checkpoints import build_vllm_llama

    return build_vllm_llama(tmp_path_factory.mktemp("sglang-model") / "tiny-llama")


@pytest.fixture(scope="module")
def offline(tiny_model, tmp_path_factory) -> dict:
    return _run("offline", tiny_model, tmp_path_factory.mktemp("sglang-offline"))


def _by_id(result: dict) -> dict[str, dict]:
    ids = [r["id"] for r in result["records"]]
    assert len(ids) == len(set(ids)), f"a request has two records: {sorted(ids)}"
    return {r["id"]: r for r in result["records"]}


def _check_records(result: dict) -> None:
    """Every request has exactly one record, equal to what SGLang returned."""
    records = _by_id(result)
    assert set(records) == {r["id"] for r in result["requests"]}
    for req in result["requests"]:
        rec, where = records[req["id"]], req["id"]
        toks = req["token_ids"]
        # one statistic per generated token: the processor ran once per sampled token
        assert rec["token_ids"] == toks, where
        assert rec["n_tokens"] == len(toks) == len(rec["confidence"]) == len(rec["entropy"])
        assert rec["finish"] == "length" == req["finish"]["type"], where
        assert rec["temperature"] == 1.0
        for k, (lp_sgl, lp, conf, ent) in enumerate(zip(
                req["logprobs"], rec["logprob"], rec["confidence"], rec["entropy"], strict=True)):
            at = f"{where} token {k}"
            assert 0.0 <= ent <= math.log(254) + 1e-4, at
            if req["kind"] == "greedy":
                assert abs(conf - math.exp(lp_sgl)) <= TOL, at
            if req["id"] == "s_no_optin":
                # exact where the sampled token is the argmax of the logits, else null
                if lp is None:
                    assert math.exp(lp_sgl) <= conf + TOL, at
                    continue
            assert lp is not None and abs(lp - lp_sgl) <= TOL, (at, lp, lp_sgl)
        if None not in rec["logprob"]:
            assert abs(rec["mean_logprob"] - sum(req["logprobs"]) / len(toks)) <= TOL
            assert abs(rec["min_prob"] - math.exp(min(req["logprobs"]))) <= TOL
    # The sampled requests did sample tokens other than the argmax (the kept-row path ran).
    sampled = [(r, records[r["id"]]) for r in result["requests"] if r["kind"] == "sampled"]
    assert any(math.exp(lp) < c - 1e-3 for r, rec in sampled if r["id"] != "s_no_optin"
               for lp, c in zip(r["logprobs"], rec["confidence"], strict=True))
    assert None in records["s_no_optin"]["logprob"]


def test_offline_engine_records_equal_sglang_logprobs(offline):
    _check_records(offline)
    kinds = {r["id"]: r["kind"] for r in offline["requests"]}
    assert "chunked" in kinds  # its 150-word prompt was prefilled in chunks of 64


def test_offline_records_written_once_while_the_engine_runs(offline):
    # Written by the scheduler process's drain thread as requests finish, not at shutdown.
    assert sorted(offline["records_before_shutdown"]) == sorted(
        r["id"] for r in offline["requests"])
    # The request sent with custom_params={} is recorded under SGLang's own request id.
    assert sum(1 for r in offline["requests"] if r["id"] not in
               ("g0", "g1", "g2", "chunked", "s0", "s1", "s_no_optin")) == 1


def test_server_records_and_metrics(tiny_model, tmp_path):
    res = _run("server", tiny_model, tmp_path)
    _check_records(res)
    m = res["metrics"]
    n_tokens = sum(len(r["token_ids"]) for r in res["requests"])
    assert m["mllmcal_token_confidence_count"] == n_tokens
    assert m["mllmcal_token_entropy_count"] == n_tokens
    assert m["mllmcal_requests_total"] == len(res["requests"])


# ---------------------------------------------------------------------------------------
# The tracker's bookkeeping against stand-ins of SGLang's request (no SGLang needed): the
# overlap scheduler's lag and extra step, requests gone without a reason, prompt chunks,
# opted-in sampled log-probs, a records folder that appears late.


class FINISH_LENGTH:  # noqa: N801 - SGLang's finish-reason class names are what is matched
    pass


class _FakeReq:
    def __init__(self, rid: str, max_new: int, prompt_len: int = 4) -> None:
        from types import SimpleNamespace

        self.rid = rid
        self.output_ids: list[int] = []
        self.sampling_params = SimpleNamespace(max_new_tokens=max_new)
        self.finished_reason = None
        self.full_untruncated_fill_ids = [0] * prompt_len
        self.extend_end = prompt_len

    def finished(self) -> bool:
        return self.finished_reason is not None


def _params(req: _FakeReq, **extra) -> dict:
    import weakref

    return {**extra, "__req__": weakref.proxy(req)}


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_tracker_bookkeeping_with_stand_in_requests(tmp_path, monkeypatch):
    import torch

    from mllmcal.integrations import sglang as sgl
    from mllmcal.integrations.sglang import CalibratedLogitProcessor, SGLangTracker

    path = tmp_path / "late" / "records.jsonl"  # its folder does not exist yet
    monkeypatch.setenv("MLLMCAL_SGLANG_RECORDS", str(path))
    monkeypatch.setenv("MLLMCAL_SGLANG_FLUSH_INTERVAL", "3600")  # drains by hand only
    monkeypatch.setenv("MLLMCAL_SGLANG_METRICS", "0")
    tr = SGLangTracker()
    monkeypatch.setattr(sgl, "_tracker", tr)  # the processor's (this process's) tracker
    g = torch.Generator().manual_seed(0)
    a, b, c = _FakeReq("ra", max_new=3), _FakeReq("rb", max_new=9), _FakeReq("rc", 9, 100)
    pa, pb, pc = _params(a, mllmcal_id="A"), _params(b, mllmcal_logprobs=True), _params(c)
    c.extend_end = 64  # its first step prefills a chunk of its 100-token prompt
    expect: dict[str, list[float]] = {"A": [], "rb": [], "rc": []}
    pending: list[tuple[_FakeReq, str, int, float]] = []
    for step in range(5):
        batch = [(a, pa), (b, pb), (c, pc)] if step < 4 else [(b, pb), (c, pc)]
        logits = torch.randn(len(batch), 30, generator=g) * 3
        out = CalibratedLogitProcessor()(logits.clone(), [p for _, p in batch])
        assert torch.equal(out, logits)  # observes only
        # The overlap scheduler appends a step's tokens after the next step has run.
        for req, key, tok, lp in pending:
            req.output_ids.append(tok)
            expect[key].append(lp)
        pending = []
        logp = torch.log_softmax(logits, -1)
        for row, (req, _) in enumerate(batch):
            key = {"ra": "A"}.get(req.rid, req.rid)
            if req is c and step == 0:
                c.extend_end = 100  # the next step prefills the last chunk
                continue
            if req is a and len(a.output_ids) + len(pending) >= 3:
                continue  # the overlap scheduler's extra step: its token is dropped
            tok = int(logits[row].argmin()) if req is b else int(logits[row].argmax())
            pending.append((req, key, tok, float(logp[row, tok])))
        if len(a.output_ids) == 3:
            a.finished_reason = FINISH_LENGTH()
        tr.drain()
    batch = req = _ = pending = None  # the test's own references to the requests
    assert not _records(path)  # the folder is missing: nothing written, nothing lost
    path.parent.mkdir()
    assert tr.drain() == 1
    assert tr.drain() == 0  # written once
    del a, pa  # SGLang drops the finished request: still no second record
    tr.drain()
    del b, pb  # b is dropped without a finish reason seen: written with what it produced
    tr.drain()
    tr.close()  # c is still running: written as "flush"
    recs = {r["id"]: r for r in _records(path)}
    assert sorted(recs) == ["A", "rb", "rc"] and len(_records(path)) == 3
    assert recs["A"]["finish"] == "length" and recs["A"]["n_tokens"] == 3
    assert recs["rb"]["finish"] == "removed" and recs["rc"]["finish"] == "flush"
    for key, rec in recs.items():
        assert rec["n_tokens"] == len(expect[key]) == len(rec["logprob"])
        for lp, want in zip(rec["logprob"], expect[key], strict=True):
            assert lp is not None and abs(lp - want) <= TOL, key
    # rb sampled the least likely token each time: exact only because it opted in.
    assert all(lp < math.log(conf) - 1 for lp, conf in
               zip(recs["rb"]["logprob"], recs["rb"]["confidence"], strict=True))


@pytest.mark.parametrize("value, match", [("0", "finite and > 0"), ("nan", "finite and > 0"),
                                          ("1e-50", "zero or subnormal in fp32"),
                                          ("1e39", "infinite in fp32")])
def test_a_bad_temperature_is_refused_at_start_up(monkeypatch, value, match):
    # 1e-50 and 1e39 passed the old check (finite, > 0) and then failed at every step,
    # where the kernels divide by the temperature in fp32.
    from mllmcal.integrations.sglang import SGLangTracker

    monkeypatch.setenv("MLLMCAL_SGLANG_TEMPERATURE", value)
    monkeypatch.setenv("MLLMCAL_SGLANG_METRICS", "0")
    with pytest.raises(ValueError, match=f"MLLMCAL_SGLANG_TEMPERATURE: .*{match}"):
        SGLangTracker()
