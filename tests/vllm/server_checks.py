"""Start vLLM's OpenAI-compatible server with mllmcal's processor and check it end to end.

Run by tests/test_integration_vllm.py with .venv-vllm's Python:

    python tests/vllm/server_checks.py --model DIR --out result.json

The server runs with PROMETHEUS_MULTIPROC_DIR set (so that /metrics sums over the API
server and the engine process, where the processor lives), MLLMCAL_VLLM_RECORDS and
MLLMCAL_VLLM_FEEDBACK. The script sends concurrent completions with ids in ``vllm_xargs``,
waits for their records, appends labelled feedback to the feedback file, reads /metrics
until the engine has applied it, then stops the server with SIGTERM. It writes what it saw;
the test asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tests/: checkpoints.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url} {body}: {exc.code} {exc.read().decode()[:2000]}") from None


def _metrics(base: str) -> dict[str, float]:
    vals = {}
    for line in _get(f"{base}/metrics").splitlines():
        if line.startswith("mllmcal_") and "{" not in line:
            name, value = line.split()[:2]
            vals[name] = float(value)
    return vals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import checkpoints

    checkpoints.build_vllm_llama(args.model)
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="mllmcal-server-"))
    prom = work / "prom"
    prom.mkdir()
    records, feedback = work / "records.jsonl", work / "feedback.jsonl"
    feedback.touch()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(prom), MLLMCAL_VLLM_RECORDS=str(records),
               MLLMCAL_VLLM_FEEDBACK=str(feedback), MLLMCAL_VLLM_FLUSH_INTERVAL="0.1",
               TORCHDYNAMO_DISABLE="1")
    log = open(work / "server.log", "w")  # noqa: SIM115
    ok = False
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "256", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
         "--max-num-seqs", "4", "--shutdown-timeout", "10",
         "--logits-processors", "mllmcal.integrations.vllm:CalibratedLogitsProcessor"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited {server.returncode}:\n"
                                   + (work / "server.log").read_text()[-6000:])
            try:
                if _get(f"{base}/health", timeout=2) is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not come up in 300 s")
            time.sleep(0.5)

        words = checkpoints.VLLM_WORDS
        jobs = [(3, 6), (1, 4), (9, 2), (5, 8), (2, 5), (7, 3)]
        results: list[dict | None] = [None] * len(jobs)

        def send(i: int, n_prompt: int, n_new: int) -> None:
            prompt = " ".join(words[(11 * i + j) % len(words)] for j in range(n_prompt))
            body = {"model": args.model, "prompt": prompt, "max_tokens": n_new,
                    "temperature": 0.0, "logprobs": 1, "ignore_eos": True,
                    "return_token_ids": True,
                    "vllm_xargs": {"mllmcal_id": f"srv-{i}", "mllmcal_feedback": True}}
            choice = _post(f"{base}/v1/completions", body)["choices"][0]
            results[i] = {"id": f"srv-{i}", "token_ids": choice["token_ids"],
                          "logprobs": choice["logprobs"]["token_logprobs"]}

        threads = [threading.Thread(target=send, args=(i, *job)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(r is None for r in results):
            raise RuntimeError("a completion request failed")
        ids = {r["id"] for r in results}
        recs = _wait(lambda: _read_records(records, ids), 30, "records")

        # Feedback by file: first tokens of even requests labelled right, odd ones wrong.
        lines, n_right = [], 0
        for i, r in enumerate(results):
            first = r["token_ids"][0]
            label = first if i % 2 == 0 else (first + 1) % 200 + 4
            n_right += label == first
            lines.append(json.dumps({"id": r["id"], "label": label}) + "\n")
        with open(feedback, "a") as f:
            f.writelines(lines)
        n_tokens = sum(len(r["token_ids"]) for r in results)
        metrics = _wait(lambda: _metrics_when(base, n_tokens, len(lines)), 30, "metrics")
        out.write_text(json.dumps({
            "requests": results, "records": recs, "metrics": metrics,
            "n_feedback": len(lines), "expected_accuracy": n_right / len(lines),
        }))
        ok = True
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
        if ok:  # on failure the folder (server.log, records) stays for a look
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"server files kept in {work}", file=sys.stderr)


def _read_records(path: Path, ids: set[str]) -> list[dict] | None:
    if not path.exists():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line]
    return recs if ids <= {r["id"] for r in recs} else None


def _metrics_when(base: str, n_tokens: int, n_feedback: int) -> dict | None:
    m = _metrics(base)
    done = (m.get("mllmcal_token_confidence_count") == n_tokens
            and m.get("mllmcal_feedback_total") == n_feedback)
    return m if done else None


def _wait(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got is not None:
            return got
        time.sleep(0.1)
    raise TimeoutError(f"{what} not complete after {timeout} s")


if __name__ == "__main__":
    main()
