"""Run in .venv-sglang by tests/test_integration_sglang.py: mllmcal's SGLang processor on
SGLang's real CPU engine. Writes what SGLang returned and what mllmcal recorded as JSON.

--mode offline: ``sglang.Engine`` in this process (its scheduler is a subprocess);
--mode server: ``python -m sglang.launch_server`` on 127.0.0.1, concurrent requests to
/generate, then its /metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mllmcal.integrations.sglang import CalibratedLogitProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: servers.py
from servers import (  # noqa: E402
    free_port,
    jsonl,
    mllmcal_metrics,
    post_json,
    served,
    wait_records,
)

WORDS = [f"w{i}" for i in range(250)]


def prompt(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + 13 * i) % len(WORDS)] for i in range(n))


# (id, prompt length in words, max_new_tokens); None id: custom_params={} (SGLang's rid).
# The 150-word prompt is prefilled in chunks (chunked_prefill_size 64).
GREEDY = [("g0", 3, 12), ("g1", 9, 5), ("g2", 20, 16), (None, 6, 8), ("chunked", 150, 10)]
SAMPLED = [("s0", 5, 12), ("s1", 12, 12), ("s_no_optin", 7, 12)]


def engine_args() -> dict:
    return dict(device="cpu", enable_custom_logit_processor=True, max_total_tokens=4096,
                chunked_prefill_size=64, random_seed=0, skip_server_warmup=True)


def requests() -> list[dict]:
    out = []
    for kind, rows in (("greedy", GREEDY), ("sampled", SAMPLED)):
        for j, (rid, n, max_new) in enumerate(rows):
            cp = {} if rid is None else {"mllmcal_id": rid}
            sp = {"max_new_tokens": max_new, "ignore_eos": True, "custom_params": cp}
            if kind == "greedy":
                sp["temperature"] = 0.0
            else:
                # Hot enough to sample tokens other than the argmax. SGLang returns the
                # log-probs before temperature (SGLANG_RETURN_ORIGINAL_LOGPROB=1 below),
                # what mllmcal records at its calibration temperature 1.
                sp.update(temperature=3.0, top_p=1.0, top_k=-1)
                cp["mllmcal_logprobs"] = rid != "s_no_optin"
            out.append({"kind": kind, "id": rid, "prompt": prompt(n, j), "sampling_params": sp})
    return out


def result_of(req: dict, out: dict) -> dict:
    meta = out["meta_info"]
    lps = meta["output_token_logprobs"]
    return {"kind": req["kind"], "id": req["id"] or meta["id"],
            "max_new_tokens": req["sampling_params"]["max_new_tokens"],
            "token_ids": [int(t) for _, t, *_ in lps], "logprobs": [float(lp) for lp, *_ in lps],
            "finish": meta["finish_reason"]}


def offline(args: argparse.Namespace, records: Path) -> dict:
    import sglang

    engine = sglang.Engine(model_path=args.model, **engine_args())
    proc = CalibratedLogitProcessor.to_str()
    results = []
    try:
        for kind in ("greedy", "sampled"):  # an all-greedy batch, then a sampled one
            reqs = [r for r in requests() if r["kind"] == kind]
            outs = engine.generate(prompt=[r["prompt"] for r in reqs],
                                   sampling_params=[r["sampling_params"] for r in reqs],
                                   return_logprob=True,
                                   custom_logit_processor=[proc] * len(reqs))
            results += [result_of(r, o) for r, o in zip(reqs, outs, strict=True)]
        before = wait_records(records, {r["id"] for r in results}, 30, every=0.2)
    finally:
        engine.shutdown()
    return {"requests": results, "records_before_shutdown": [r["id"] for r in before]}


def server(args: argparse.Namespace, records: Path) -> dict:
    port = free_port()
    a = engine_args()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--enable-custom-logit-processor", "--max-total-tokens", str(a["max_total_tokens"]),
           "--chunked-prefill-size", str(a["chunked_prefill_size"]),
           "--random-seed", "0", "--skip-server-warmup", "--enable-metrics"]
    base = f"http://127.0.0.1:{port}"
    with served(cmd, log=Path(args.out).with_suffix(".server.log"),
                health_url=base + "/health", timeout=240, session=False, term_group=False,
                grace=30):
        proc = CalibratedLogitProcessor.to_str()

        def one(r: dict) -> dict:
            return result_of(r, post_json(base + "/generate", {
                "text": r["prompt"], "sampling_params": r["sampling_params"],
                "return_logprob": True, "custom_logit_processor": proc}))

        # All at once: greedy and sampled requests share batches.
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, requests()))
        before = wait_records(records, {r["id"] for r in results}, 30, every=0.2)
        time.sleep(1.0)
        metrics = mllmcal_metrics(base)
    return {"requests": results, "records_before_shutdown": [r["id"] for r in before],
            "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["offline", "server"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    records = Path(args.out).with_suffix(".records.jsonl")
    os.environ["MLLMCAL_SGLANG_RECORDS"] = str(records)
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
    res = offline(args, records) if args.mode == "offline" else server(args, records)
    res["records"] = jsonl(records)
    Path(args.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
