"""mllmcal's vLLM processor on the real vLLM CPU engine (and V2 against vLLM's classes).

vLLM lives in its own venv (.venv-vllm, made by scripts/setup_vllm.sh): its pins conflict
with the project's. Each check here runs one script there by subprocess, once per engine
start (an engine takes seconds in-process and ~30-50 s as a separate process), and asserts
on the JSON it writes. Without .venv-vllm the tests skip locally and FAIL under CI=true.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import need_environment

ROOT = Path(__file__).resolve().parents[1]
VPY = ROOT / ".venv-vllm" / "bin" / "python"
SCRIPTS = ROOT / "tests" / "vllm"
TOL = 1e-5


def _run(args: list[str], timeout: float, *, path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    need_environment(VPY, "setup_vllm.sh")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLLMCAL_", "PROMETHEUS_", "VLLM_", "TRITON_"))}
    # this checkout's mllmcal, whatever the .pth says; then ``path`` (e.g. entry points)
    env["PYTHONPATH"] = os.pathsep.join(map(str, (ROOT, *path)))
    proc = subprocess.run([str(VPY), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{args[0]} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                    f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def entry_point_site(tmp_path_factory) -> Path:
    """A site folder that registers mllmcal's ``vllm.logits_processors`` entry point the way
    ``pip install`` of the package does: a dist-info folder whose entry_points.txt is what
    pyproject.toml declares (importlib.metadata scans every folder on sys.path). The venv
    reaches the checkout through a .pth file, which registers no entry point."""
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    site = tmp_path_factory.mktemp("site")
    dist = site / "mllmcal-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mllmcal\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items())
        for group, items in eps.items()))
    return site


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm-model") / "tiny-llama"
    _run([str(ROOT / "tests" / "checkpoints.py"), str(path)], timeout=300)
    return path


def _engine(mode: str, model: Path, tmp: Path) -> dict:
    out = tmp / f"{mode}.json"
    _run([str(SCRIPTS / "engine_checks.py"), "--mode", mode, "--model", str(model),
          "--out", str(out)], timeout=600)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def inproc(tiny_model, tmp_path_factory) -> dict:
    return _engine("inproc", tiny_model, tmp_path_factory.mktemp("inproc"))


@pytest.fixture(scope="module")
def multiproc(tiny_model, tmp_path_factory) -> dict:
    return _engine("mp", tiny_model, tmp_path_factory.mktemp("mp"))


def _by_id(result: dict) -> dict[str, dict]:
    ids = [r["id"] for r in result["records"]]
    assert len(ids) == len(set(ids)), f"a request has two records: {sorted(ids)}"
    return {r["id"]: r for r in result["records"]}


def _check_exactness(result: dict) -> None:
    records = _by_id(result)
    kinds = {r["kind"] for r in result["requests"]}
    assert {"greedy", "chunked", "sampled", "sampled_no_optin", "stop_string"} <= kinds
    for req in result["requests"]:
        rec = records.get(req["id"])
        assert rec is not None, f"no record for {req['id']}"
        toks = req["token_ids"]
        if req["kind"] == "stop_string":
            # vLLM's output stops where the stop string matched. The engine may have gone on
            # generating until the abort reached it (the record holds those tokens), never
            # fewer. With the engine in its own process the abort is asynchronous, so in
            # principle it could even reach max_tokens first: then "length", with exactly
            # max_tokens tokens.
            assert rec["token_ids"][: len(toks)] == toks
            assert rec["n_tokens"] == len(rec["token_ids"]) >= len(toks)
            if rec["finish"] == "length":
                assert rec["n_tokens"] == req["max_tokens"], rec
            else:
                assert rec["finish"] in ("flush", "removed"), rec
                assert rec["n_tokens"] < req["max_tokens"], rec
            continue
        assert rec["token_ids"] == toks, req["id"]
        assert rec["n_tokens"] == len(toks) == len(rec["confidence"]) == len(rec["entropy"])
        assert rec["finish"] == "length"
        for k, (lp_vllm, top1, lp, conf, ent) in enumerate(zip(
                req["logprobs"], req["top1"], rec["logprob"], rec["confidence"], rec["entropy"], strict=True)):
            where = f"{req['id']} token {k}"
            # confidence is the top-1 probability of the same (raw) distribution
            assert abs(conf - math.exp(top1)) <= TOL, where
            assert 0.0 <= ent <= math.log(254) + 1e-4, where
            if req["kind"] == "sampled_no_optin":
                # exact where the sampled token is the argmax, null elsewhere
                if lp is not None:
                    assert abs(lp - lp_vllm) <= TOL, where
                elif abs(lp_vllm - top1) <= 1e-9:
                    pytest.fail(f"{where}: the argmax was sampled but its logprob is null")
                continue
            assert lp is not None, where
            assert abs(lp - lp_vllm) <= TOL, (where, lp, lp_vllm)
            if req["kind"] in ("greedy", "chunked"):
                assert abs(conf - math.exp(lp_vllm)) <= TOL, where
        if req["kind"] != "sampled_no_optin":
            assert abs(rec["mean_logprob"] - sum(req["logprobs"]) / len(toks)) <= TOL
            assert abs(rec["min_prob"] - math.exp(min(req["logprobs"]))) <= TOL
    # The sampled requests really sampled: some token was not the argmax.
    sampled = [r for r in result["requests"] if r["kind"] == "sampled"]
    assert any(abs(a - b) > 1e-3 for r in sampled for a, b in zip(r["logprobs"], r["top1"], strict=True))
    nulls = [lp for r in result["requests"] if r["kind"] == "sampled_no_optin"
             for lp in records[r["id"]]["logprob"]]
    assert None in nulls, "no non-argmax token in the non-opted-in sampled request"


def test_inprocess_engine_records_equal_vllm_logprobs(inproc):
    _check_exactness(inproc)


def test_inprocess_records_written_as_requests_finish(inproc):
    ids = {r["id"] for r in inproc["requests"] if r["kind"] != "stop_string"}
    # Ended by max_tokens: written by the drain thread, with no removed event and no flush.
    assert ids <= set(inproc["records_before_flush"])
    assert inproc["flushed"] == 1  # only the stop-string request was still open


def test_inprocess_metrics_count_generated_tokens(inproc):
    n_tokens = sum(r["n_tokens"] for r in inproc["records"])
    assert n_tokens > 0
    assert inproc["metric_confidence_count"] == n_tokens
    assert inproc["metric_entropy_count"] == n_tokens
    assert inproc["metric_requests"] == len(inproc["records"])
    # The one request sent without an mllmcal_id got a generated one.
    generated = {r["id"] for r in inproc["records"]} - {r["id"] for r in inproc["requests"]}
    assert len(generated) == 1 and next(iter(generated)).startswith("mllmcal-")


def test_inprocess_feedback_updates_calibration_and_temperature(inproc):
    fb = inproc["feedback"]
    assert fb["n_feedback"] == fb["state_count"] == fb["n_items"] == fb["counter_feedback"]
    # Labels never equal the generated token; the one correctness-only item is correct.
    assert fb["state_accuracy"] == pytest.approx(1 / fb["n_items"])
    # Wrong labels on confident predictions: the online temperature must rise.
    assert fb["temperature"] > 1.5
    assert fb["gauge_temperature"] == pytest.approx(fb["temperature"])
    assert fb["gauge_ece"] == pytest.approx(fb["state_ece"])
    assert fb["gauge_accuracy"] == pytest.approx(fb["state_accuracy"])


def test_multiprocess_engine_records_equal_vllm_logprobs(multiproc):
    _check_exactness(multiproc)
    stop_id = next(r["id"] for r in multiproc["requests"] if r["kind"] == "stop_string")
    # Finished-by-length records are written while the engine runs. The stop-string one is
    # written when the worker finds it gone: usually at shutdown, possibly before.
    ids = {r["id"] for r in multiproc["requests"]}
    before = set(multiproc["records_before_shutdown"])
    assert ids - {stop_id} <= before
    stop_rec = _by_id(multiproc)[stop_id]
    if stop_id in before:  # found gone (or at max_tokens) while the engine still ran
        assert stop_rec["finish"] in ("removed", "length"), stop_rec
    else:
        assert stop_rec["finish"] in ("flush", "removed"), stop_rec


def test_openai_server_metrics_and_records(tiny_model, entry_point_site, tmp_path):
    # The README's server command, with the entry point installed too: counted once.
    out = tmp_path / "server.json"
    _run([str(SCRIPTS / "server_checks.py"), "--model", str(tiny_model), "--out", str(out)],
         timeout=600, path=(entry_point_site,))
    res = json.loads(out.read_text())
    records = {r["id"]: r for r in res["records"]}
    n_tokens = 0
    for req in res["requests"]:
        rec = records.get(req["id"])
        assert rec is not None, f"no record for {req['id']}"
        assert rec["token_ids"] == req["token_ids"]
        for lp, lp_vllm in zip(rec["logprob"], req["logprobs"], strict=True):
            assert abs(lp - lp_vllm) <= TOL
        n_tokens += len(req["token_ids"])
    m = res["metrics"]
    assert m["mllmcal_token_confidence_count"] == n_tokens
    assert m["mllmcal_token_entropy_count"] == n_tokens
    assert m["mllmcal_requests_total"] == len(res["requests"])
    # Feedback through the file reached the engine process and its gauges.
    assert m["mllmcal_feedback_total"] == res["n_feedback"] > 0
    assert 0.0 <= m["mllmcal_ece"] <= 1.0
    assert m["mllmcal_accuracy"] == pytest.approx(res["expected_accuracy"])


def test_loading_routes_records_and_feedback_files(tiny_model, entry_point_site, tmp_path):
    """One in-process vLLM engine per loading route, with the entry point installed:
    exactly one active instance, inert unless asked; records written once each even when
    their folder appears late; feedback read across truncation and rotation."""
    out = tmp_path / "loading.json"
    _run([str(SCRIPTS / "loading_checks.py"), "--model", str(tiny_model), "--out", str(out)],
         timeout=600, path=(entry_point_site,))
    res = json.loads(out.read_text())
    assert "mllmcal.integrations.vllm:CalibratedLogitsProcessor" in res["entry_points"]
    # Entry point + logits_processors: one active instance, every token and record once.
    e1 = res["e1"]
    assert e1["active_trackers"] == 1
    assert e1["confidence_count"] == e1["n_tokens"] > 0
    assert e1["requests_total"] == len(e1["requests"])
    # Records: not written while their folder is missing (the failures are counted), then
    # written once each when it appears.
    assert not e1["written_before_mkdir"] and e1["write_errors_before_mkdir"] >= 1
    by_id = _by_id({"records": e1["records"]})
    assert set(by_id) == {r["id"] for r in e1["requests"]}
    for r in e1["requests"]:
        assert by_id[r["id"]]["token_ids"] == r["token_ids"]
    # Feedback: applied after the file was truncated, and after it was rotated; a last
    # line without its newline is not applied.
    assert res["feedback_applied"] == [1, 2, 3, 3]
    # The entry point alone: inert (no tracker, no metrics, no records).
    assert res["e2"] == {"active_trackers": 0, "records_added": 0,
                         "metrics_moved": {"mllmcal_token_confidence_count": 0.0,
                                           "mllmcal_requests_total": 0.0}}
    # The entry point enabled by additional_config.
    e3 = res["e3"]
    assert e3["active_trackers"] == 1 and e3["confidence_count"] == e3["n_tokens"] > 0
    assert len(e3["records"]) == 3
    _check_low_confidence_stop(res["stop"])
    # Offline: response_stats() gives each output its own statistics (one client id for all).
    for o in res["offline"]:
        st = o["stats"]
        assert st["id"] == "same" and st["token_ids"] == o["token_ids"], o
        for lp, lp_vllm in zip(st["logprob"], o["logprobs"], strict=True):
            assert abs(lp - lp_vllm) <= TOL, o


def _check_low_confidence_stop(res: dict) -> None:
    """A threshold above any confidence: every request stops right after its first window
    (the CPU engine has no copy lag), with the stop token forced; finish says so."""
    w, recs = res["window"], _by_id({"records": res["records"]})
    for req in res["requests"]:
        rec, toks = recs[req["id"]], req["token_ids"]
        assert rec["token_ids"] == toks, req
        if req["id"] == "stop-never":
            assert rec["finish"] in ("length", "stop") and len(toks) <= 6
            continue
        stop_tok = 7 if req["id"] == "stop-ignore-eos" else res["eos"]
        assert req["finish_reason"] == "stop" and len(toks) == w + 1, req
        assert toks[-1] == stop_tok and stop_tok not in toks[:-1], req
        assert rec["finish"] == "low_confidence", rec
        # The forced token's log-prob is the model's (unforced) one, as vLLM reports it.
        for lp, lp_vllm in zip(rec["logprob"], req["logprobs"], strict=True):
            assert abs(lp - lp_vllm) <= TOL, (req["id"], rec["logprob"], req["logprobs"])


def _check_served(r: dict, greedy_tol: float = TOL) -> None:
    """One response from serve_checks.Client: statistics aligned with its tokens and, for
    greedy requests, equal to vLLM's own log-probs."""
    spec, st = r["spec"], r["stats"]
    if not spec.get("ask"):
        assert st is None, r
        return
    assert st is not None and "error" not in st, r
    assert len(st["confidence"]) == len(st["entropy"]) == len(st["logprob"]) == r["n_tokens"]
    assert st["id"] == spec.get("cid") or (spec.get("cid") is None
                                           and st["id"].startswith("mllmcal-"))
    if r.get("token_ids") is not None:
        assert st["token_ids"] == r["token_ids"], r
    assert len(r["logprobs"]) == r["n_tokens"]
    if spec["greedy"]:
        for lp, lp_vllm in zip(st["logprob"], r["logprobs"], strict=True):
            assert abs(lp - lp_vllm) <= greedy_tol, (spec, st["logprob"], r["logprobs"])
        assert abs(st["mean_logprob"] - sum(r["logprobs"]) / r["n_tokens"]) <= greedy_tol
    else:  # sampled: exact too (the middleware opts the request in to mllmcal_logprobs)
        for lp, lp_vllm in zip(st["logprob"], r["logprobs"], strict=True):
            assert lp is not None and abs(lp - lp_vllm) <= 1e-4, (spec, st, r["logprobs"])
    assert st["temperature"] == 1.0


def _check_records_once(records: list[dict], results: list[dict]) -> None:
    """Exactly one record per request: as many records per client id as requests sent with
    it, and one generated id per request sent without."""
    from collections import Counter

    want = Counter(r["spec"].get("cid") for r in results)
    got = Counter(rec["id"] if not rec["id"].startswith("mllmcal-") else None
                  for rec in records)
    assert got == want, (got, want)
    ids = [rec["id"] for rec in records if rec["id"].startswith("mllmcal-")]
    assert len(ids) == len(set(ids))


def test_mllmcal_serve_returns_statistics_behind_the_api_key(tiny_model, entry_point_site,
                                                             tmp_path):
    """`mllmcal serve` (the entry point installed too): concurrent requests with one shared
    client id each get their own statistics, in completions and chat, streamed or not;
    requests that did not ask get none; the feedback endpoint needs the API key."""
    out = tmp_path / "serve.json"
    _run([str(SCRIPTS / "serve_checks.py"), "--model", str(tiny_model), "--out", str(out),
          "--load", "24", "--concurrency", "8", "--rounds", "3"],
         timeout=600, path=(entry_point_site,))
    res = json.loads(out.read_text())
    assert res["no_key_completion"] == 401
    for r in res["basic"]:
        _check_served(r)
        if r["spec"].get("stream"):
            # the last chunk carries them all, no other chunk does
            assert r["mllmcal_in_chunks"] == (1 if r["spec"].get("ask") else 0)
    stopper = next(r for r in res["basic"] if r["spec"]["cid"] == "stopper")
    assert stopper["stats"]["finish"] == "low_confidence"
    assert stopper["finish_reason"] == "stop" and stopper["n_tokens"] == 4
    assert (res["feedback_no_key"], res["feedback_bad_key"], res["feedback_bad_body"],
            res["feedback_key"]) == (401, 401, 400, 200)
    m = res["metrics_basic"]
    assert m["mllmcal_token_confidence_count"] == res["n_tokens_basic"]
    assert m["mllmcal_requests_total"] == len(res["basic"])
    assert m["mllmcal_feedback_total"] == 1
    # Under load (3 rounds of 24 mixed requests at concurrency 8; bench/bench_vllm_load.py
    # runs the full size): nothing lost or doubled, greedy log-probs exact, metrics settled
    # on the completion tokens, the engine's RSS flat.
    for rnd in res["load"]:
        for r in rnd["results"]:
            _check_served(r)
    _check_records_once(res["records"], res["basic"] + [r for rnd in res["load"]
                                                        for r in rnd["results"]])
    sys.path.insert(0, str(SCRIPTS))
    from serve_checks import analyse

    a = analyse(res)
    assert a["duplicates"] == a["lost"] == a["bad_stats"] == 0, a
    assert a["metric_tokens"] == a["completion_tokens"], a
    assert a["metric_requests"] == a["requests"] == a["records"], a
    assert a["rss_mib"][-1] - a["rss_mib"][0] < 64, a


def test_v2_processor_against_installed_interface():
    """Model Runner V2 needs Triton on the device, which this CPU build lacks, so the V2
    path runs against vLLM's own V2 classes with hand-built contexts (pytest in .venv-vllm).
    The same run checks loading by name and through the entry point (load_checks.py)."""
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(SCRIPTS),
                 "-c", os.devnull, str(SCRIPTS / "v2_unit.py")], timeout=300)
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout


def test_readme_vllm_example_runs(tiny_model, tmp_path):
    proc = _run([str(SCRIPTS / "readme_example.py"), str(ROOT / "README.md"), str(tiny_model),
                 str(tmp_path)], timeout=300)
    assert proc.stdout.strip().endswith("OK"), proc.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
