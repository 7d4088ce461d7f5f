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
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tests/: checkpoints.py, servers.py
from servers import (  # noqa: E402
    free_port,
    mllmcal_metrics,
    post_json,
    scratch,
    served,
    vllm_model_args,
    wait_for,
    wait_records,
)


def main() -> None:
    args = vllm_model_args(argparse.ArgumentParser())

    import checkpoints

    with scratch("mllmcal-server-") as work:  # on failure server.log and records stay
        _check(args, checkpoints.VLLM_WORDS, work)


def _check(args: argparse.Namespace, words: list[str], work: Path) -> None:
    prom = work / "prom"
    prom.mkdir()
    records, feedback = work / "records.jsonl", work / "feedback.jsonl"
    feedback.touch()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(prom), MLLMCAL_VLLM_RECORDS=str(records),
               MLLMCAL_VLLM_FEEDBACK=str(feedback), MLLMCAL_VLLM_FLUSH_INTERVAL="0.1",
               TORCHDYNAMO_DISABLE="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
           "--max-num-seqs", "4", "--shutdown-timeout", "10",
           "--logits-processors", "mllmcal.integrations.vllm:CalibratedLogitsProcessor"]
    # SIGTERM to the API server only: it shuts its engine process down itself.
    with served(cmd, env=env, log=work / "server.log", health_url=f"{base}/health",
                timeout=300, term_group=False):
        jobs = [(3, 6), (1, 4), (9, 2), (5, 8), (2, 5), (7, 3)]
        results: list[dict | None] = [None] * len(jobs)

        def send(i: int, n_prompt: int, n_new: int) -> None:
            prompt = " ".join(words[(11 * i + j) % len(words)] for j in range(n_prompt))
            body = {"model": args.model, "prompt": prompt, "max_tokens": n_new,
                    "temperature": 0.0, "logprobs": 1, "ignore_eos": True,
                    "return_token_ids": True,
                    "vllm_xargs": {"mllmcal_id": f"srv-{i}", "mllmcal_feedback": True}}
            choice = post_json(f"{base}/v1/completions", body)["choices"][0]
            results[i] = {"id": f"srv-{i}", "token_ids": choice["token_ids"],
                          "logprobs": choice["logprobs"]["token_logprobs"]}

        threads = [threading.Thread(target=send, args=(i, *job)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(r is None for r in results):
            raise RuntimeError("a completion request failed")
        recs = wait_records(records, {r["id"] for r in results}, 30, "records")

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

        def applied() -> dict | None:
            m = mllmcal_metrics(base)
            done = (m.get("mllmcal_token_confidence_count") == n_tokens
                    and m.get("mllmcal_feedback_total") == len(lines))
            return m if done else None

        metrics = wait_for(applied, 30, "metrics")
        Path(args.out).write_text(json.dumps({
            "requests": results, "records": recs, "metrics": metrics,
            "n_feedback": len(lines), "expected_accuracy": n_right / len(lines),
        }))


if __name__ == "__main__":
    main()
