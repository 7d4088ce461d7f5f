"""``mllmcal serve`` end to end: statistics in the responses, behind the API key.

Run by tests/test_integration_vllm.py with .venv-vllm's Python (with the entry point
registered on PYTHONPATH, as an installed package has it):

    python tests/vllm/serve_checks.py --model DIR --out result.json [--load N --concurrency C]

Sends, concurrently, completions and chat completions (some streamed, greedy and sampled),
most asking for statistics with the SAME client ``mllmcal_id``, some not asking, one that
stops on low confidence; posts feedback with and without the key; reads /metrics and the
records. With ``--load N`` it also sends N mixed requests at concurrency C in three rounds
and samples the engine process's RSS after each. It writes what it saw; the test asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tests/: checkpoints.py, servers.py
from servers import (  # noqa: E402
    free_port,
    http,
    jsonl,
    mllmcal_metrics,
    scratch,
    served,
    vllm_model_args,
    wait_for,
)

KEY = "sesame-test-key"


def _sse(raw: bytes) -> list[dict]:
    out = []
    for ev in raw.decode().split("\n\n"):
        if ev.startswith("data: ") and ev[6:].strip() != "[DONE]":
            out.append(json.loads(ev[6:]))
    return out


def _engine_rss(server_pid: int) -> int:
    """RSS in bytes of the largest descendant of the server (the engine core process)."""
    best = 0
    kids = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True)
    pids = [int(p) for p in kids.stdout.split()]
    for pid in list(pids):
        more = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        pids += [int(p) for p in more.stdout.split()]
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return best


class Client:
    def __init__(self, base: str, model: str) -> None:
        self.base, self.model = base, model

    def send(self, spec: dict) -> dict:
        """One request from a spec: kind (completion/chat), stream, greedy, ask, cid,
        n_new, prompt, extra xargs. Returns what the test needs."""
        xargs = dict(spec.get("xargs", {}))
        if spec.get("ask"):
            xargs["mllmcal"] = 1
        if spec.get("cid") is not None:
            xargs["mllmcal_id"] = spec["cid"]
        body: dict = {"model": self.model, "max_tokens": spec["n_new"],
                      "temperature": 0.0 if spec["greedy"] else 0.9,
                      "ignore_eos": spec.get("ignore_eos", True), "vllm_xargs": xargs}
        if not spec["greedy"]:
            body["seed"] = spec.get("seed", 1)
        chat = spec["kind"] == "chat"
        if chat:
            body["messages"] = [{"role": "user", "content": spec["prompt"]}]
            body["logprobs"] = True
            path = "/v1/chat/completions"
        else:
            body["prompt"] = spec["prompt"]
            body["logprobs"] = 1
            body["return_token_ids"] = True
            path = "/v1/completions"
        if spec.get("stream"):
            body["stream"] = True
        status, raw = http(self.base + path, body, key=KEY)
        if status != 200:
            raise RuntimeError(f"{path} {status}: {raw[:1000]!r}")
        res = {"spec": spec}
        if spec.get("stream"):
            chunks = _sse(raw)
            lps, stats, usage = [], None, None
            for c in chunks:
                for ch in c.get("choices", []):
                    lp = ch.get("logprobs")
                    if lp:
                        lps += ([x["logprob"] for x in lp["content"]] if chat
                                else lp["token_logprobs"])
                if c.get("usage"):
                    usage = c["usage"]
                if "mllmcal" in c:
                    stats = c["mllmcal"]["choices"][0]
            res.update(logprobs=lps, stats=stats, n_tokens=usage["completion_tokens"],
                       mllmcal_in_chunks=sum("mllmcal" in c for c in chunks))
        else:
            resp = json.loads(raw)
            ch = resp["choices"][0]
            lp = ch["logprobs"]
            res.update(logprobs=[x["logprob"] for x in lp["content"]] if chat
                       else lp["token_logprobs"],
                       stats=ch.get("mllmcal"), n_tokens=resp["usage"]["completion_tokens"],
                       token_ids=ch.get("token_ids"), finish_reason=ch.get("finish_reason"))
        return res


def _basic_specs(words: list[str]) -> list[dict]:
    def prompt(i: int, n: int) -> str:
        return " ".join(words[(7 * i + j) % len(words)] for j in range(n))

    specs = []
    for i, (n_p, n_new) in enumerate([(3, 6), (1, 4), (9, 2), (5, 8), (2, 5), (7, 3)]):
        specs.append({"kind": "completion", "greedy": True, "ask": True, "cid": "same",
                      "n_new": n_new, "prompt": prompt(i, n_p), "stream": i % 3 == 2})
    specs.append({"kind": "completion", "greedy": False, "ask": True, "cid": "same",
                  "n_new": 7, "prompt": prompt(8, 4), "seed": 5})
    specs.append({"kind": "chat", "greedy": True, "ask": True, "cid": "same", "n_new": 5,
                  "prompt": prompt(9, 4)})
    specs.append({"kind": "chat", "greedy": True, "ask": True, "cid": "same", "n_new": 6,
                  "prompt": prompt(10, 3), "stream": True})
    specs.append({"kind": "completion", "greedy": True, "ask": False, "cid": "same",
                  "n_new": 4, "prompt": prompt(11, 3)})
    specs.append({"kind": "completion", "greedy": True, "ask": False, "cid": None,
                  "n_new": 3, "prompt": prompt(12, 3)})
    specs.append({"kind": "completion", "greedy": True, "ask": True, "cid": "stopper",
                  "n_new": 12, "prompt": prompt(13, 3), "ignore_eos": False,
                  "xargs": {"mllmcal_stop_below": 1.01, "mllmcal_stop_window": 3}})
    return specs


def _load_specs(words: list[str], n: int, rng: random.Random) -> list[dict]:
    specs = []
    for i in range(n):
        specs.append({
            "kind": "chat" if i % 5 == 0 else "completion",
            "greedy": i % 3 != 1, "ask": i % 4 != 3, "stream": i % 4 == 1,
            "cid": (f"load-{i % 7}" if i % 2 else None), "seed": i,
            "n_new": rng.choice([1, 2, 4, 8, 16, 24]),
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 24)))})
    return specs


def analyse(res: dict, tol: float = 1e-5) -> dict:
    """Figures of a load run (``res["load"]``): requests, records, duplicates, lost, greedy
    log-prob agreement, metrics against completion tokens, engine RSS per round."""
    from collections import Counter

    results = [r for rnd in res["load"] for r in rnd["results"]]
    all_results = res["basic"] + results
    want = Counter(r["spec"].get("cid") for r in all_results)
    got = Counter(rec["id"] if not rec["id"].startswith("mllmcal-") else None
                  for rec in res["records"])
    worst, bad_stats, n_greedy = 0.0, 0, 0
    for r in results:
        st = r["stats"]
        if not r["spec"].get("ask"):
            bad_stats += st is not None
            continue
        if st is None or "error" in st or len(st["logprob"]) != r["n_tokens"]:
            bad_stats += 1
            continue
        if r["spec"]["greedy"]:
            n_greedy += 1
            for a, b in zip(st["logprob"], r["logprobs"], strict=True):
                worst = max(worst, abs(a - b))
    last = res["load"][-1]
    return {
        "requests": len(all_results),
        "load_requests": len(results),
        "records": len(res["records"]),
        "duplicates": sum(max(0, got[k] - want[k]) for k in got),
        "lost": sum(max(0, want[k] - got[k]) for k in want),
        "bad_stats": bad_stats,
        "greedy_with_stats": n_greedy,
        "greedy_max_abs_logprob_diff": worst,
        "greedy_within_tol": worst <= tol,
        "metric_tokens": last["metrics"].get("mllmcal_token_confidence_count"),
        "completion_tokens": last["total_tokens"],
        "metric_requests": last["metrics"].get("mllmcal_requests_total"),
        "rss_mib": [rnd["rss"] / 2**20 for rnd in res["load"]],
        "wall_s": [rnd["wall_s"] for rnd in res["load"]],
        "load_avg": res.get("load_avg"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", type=int, default=0, help="requests per load round (0: none)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    args = vllm_model_args(ap)

    import checkpoints

    with scratch("mllmcal-serve-") as work:
        _serve(args, checkpoints.VLLM_WORDS, work)


def _serve(args: argparse.Namespace, words: list[str], work: Path) -> None:
    records = work / "records.jsonl"
    template = work / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLLMCAL_VLLM_RECORDS=str(records),
               MLLMCAL_VLLM_FLUSH_INTERVAL="0.05", TORCHDYNAMO_DISABLE="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("MLLMCAL_VLLM_FEEDBACK", None)
    cmd = [sys.executable, "-m", "mllmcal", "serve", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
           "--max-num-seqs", str(args.max_num_seqs), "--shutdown-timeout", "10",
           "--api-key", KEY, "--chat-template", str(template)]
    res: dict = {}
    try:
        with served(cmd, env=env, log=work / "server.log", health_url=f"{base}/health",
                    timeout=300) as server:
            client = Client(base, args.model)

            # Without the key: vLLM's endpoints and mllmcal's feedback endpoint refuse.
            res["no_key_completion"] = http(f"{base}/v1/completions", {
                "model": args.model, "prompt": "a", "max_tokens": 1})[0]
            specs = _basic_specs(words)
            with ThreadPoolExecutor(len(specs)) as ex:
                res["basic"] = list(ex.map(client.send, specs))
            feedback = f"{base}/v1/mllmcal/feedback"
            res["feedback_no_key"] = http(feedback, {"id": "stopper", "correct": True})[0]
            res["feedback_bad_key"] = http(feedback, {"id": "stopper", "correct": True},
                                           key="wrong")[0]
            res["feedback_bad_body"] = http(feedback, {"correct": True}, key=KEY)[0]
            res["feedback_key"] = http(feedback, [{"id": "stopper", "correct": True}],
                                       key=KEY)[0]
            n_basic = sum(r["n_tokens"] for r in res["basic"])

            def basic_counted() -> bool:
                m = mllmcal_metrics(base)
                return (m.get("mllmcal_token_confidence_count") == n_basic
                        and m.get("mllmcal_feedback_total") == 1)

            wait_for(basic_counted, 30)
            res["metrics_basic"] = mllmcal_metrics(base)
            res["n_tokens_basic"] = n_basic

            if args.load:
                rng = random.Random(0)
                res["load"] = []
                total = n_basic
                for _ in range(args.rounds):
                    specs = _load_specs(words, args.load, rng)
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(args.concurrency) as ex:
                        got = list(ex.map(client.send, specs))
                    wall = time.perf_counter() - t0
                    total += sum(r["n_tokens"] for r in got)
                    wait_for(lambda t=total: mllmcal_metrics(base).get(
                        "mllmcal_token_confidence_count") == t, 60, every=0.2)
                    res["load"].append({"results": got, "wall_s": wall,
                                        "rss": _engine_rss(server.pid),
                                        "metrics": mllmcal_metrics(base), "total_tokens": total})
            time.sleep(0.5)
            res["records"] = jsonl(records)
            res["load_avg"] = os.getloadavg()
    finally:
        res["server_log_tail"] = (work / "server.log").read_text()[-3000:]
        Path(args.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
