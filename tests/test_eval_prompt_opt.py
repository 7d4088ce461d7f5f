"""APE prompt optimisation: ranking, the loop with the offline proposer, the HTTP proposer."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from mllmcal.eval.prompt_opt import (
    BankProposer,
    OpenAIProposer,
    clean_prompt,
    make_proposer,
    optimize_prompts,
    rank_key,
)


def test_rank_is_accuracy_bucket_first_then_ece():
    scores = {"a": (0.61, 0.30), "b": (0.79, 0.10), "c": (0.60, 0.05), "d": (0.95, 0.40)}
    order = sorted(scores, key=lambda p: rank_key(p, scores[p]))
    # d is alone in bucket 4; a, b, c share bucket 3 (0.6/0.2 must not round down to 2)
    assert order == ["d", "c", "b", "a"]


def test_bank_proposer_is_deterministic_and_paraphrases():
    p = BankProposer(seed=0)
    out = p.propose("The answer might be", 5, round_index=1)
    assert 1 <= len(out) <= 5 and "The answer might be" not in out
    assert out == BankProposer(seed=0).propose("The answer might be", 5, round_index=1)
    assert all(o == clean_prompt(o) and o for o in out)


def test_ape_loop_keeps_top_k_and_finds_the_best_scoring_prompt():
    # A synthetic scorer with a known optimum: prompts containing "likely" are better
    # calibrated, longer prompts lose accuracy buckets past 6 words.
    calls = []

    def score(prompt):
        calls.append(prompt)
        acc = 0.9 if len(prompt.split()) <= 6 else 0.5
        ece = 0.05 if "likely" in prompt else 0.2 + 0.01 * len(prompt)
        return acc, ece

    res = optimize_prompts(score, BankProposer(0), seeds=["Answer", "The answer might be"],
                           k=3, m=4, n_rounds=4, progress=False)
    assert len(calls) == len(set(calls)) == len(res.scores)  # every prompt scored once
    assert len(res.trajectory) == 5 and res.trajectory[0]["round"] == 0
    best_key = min(rank_key(p, s) for p, s in res.scores.items())
    assert rank_key(res.best, res.scores[res.best]) == best_key
    assert "likely" in res.best and len(res.best.split()) <= 6
    # the best is monotone over rounds
    keys = [rank_key(t["best_prompt"], (t["accuracy"], t["ece"])) for t in res.trajectory]
    assert keys == sorted(keys, reverse=True)
    with pytest.raises(ValueError):
        optimize_prompts(score, BankProposer(0), k=0)


class _Handler(BaseHTTPRequestHandler):
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append((self.path, self.headers.get("Authorization"), body))
        n = body["n"]
        reply = {"choices": [{"message": {"content": f'"The answer, take {i}, is":'}}
                             for i in range(n)]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_compatible_proposer_over_http():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        prop = make_proposer(url)
        assert isinstance(prop, OpenAIProposer)
        prop.api_key = "k"
        out = prop.propose("Answer", 3, 1)
    finally:
        server.shutdown()
    assert out == ["The answer, take 0, is", "The answer, take 1, is", "The answer, take 2, is"]
    path, auth, body = _Handler.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["n"] == 3
    assert "Answer" in body["messages"][0]["content"]


def test_unreachable_endpoint_and_bad_spec_are_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="proposer endpoint"):
        OpenAIProposer("http://127.0.0.1:9", timeout=2).propose("Answer", 1, 1)
    with pytest.raises(ValueError, match="proposer must be"):
        make_proposer(str(tmp_path / "nope"))


def test_check_proposer_says_what_is_wrong_without_proposing(tmp_path):
    import socket

    from mllmcal.eval.prompt_opt import check_proposer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="cannot reach the endpoint"):
        check_proposer(f"http://127.0.0.1:{port}/v1", timeout=2)
    with pytest.raises(ValueError, match="proposer must be"):
        check_proposer(str(tmp_path / "nope"))
    check_proposer("bank")
    check_proposer(str(tmp_path))  # a directory: loaded only when proposing
    server = HTTPServer(("127.0.0.1", 0), _Handler)  # answers GET with an HTTP error: fine
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_proposer(f"http://127.0.0.1:{server.server_port}/v1", timeout=5)
    finally:
        server.shutdown()
