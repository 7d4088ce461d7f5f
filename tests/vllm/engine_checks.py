"""Run the vLLM CPU engine once with mllmcal's processor and dump what both recorded.

Run by tests/test_integration_vllm.py with .venv-vllm's Python:

    python tests/vllm/engine_checks.py --mode inproc|mp --model DIR --out result.json

It generates, in one engine: greedy requests of different prompt lengths and max_tokens
with ``logprobs=1``; a long prompt prefilled in several chunks; sampled requests (T = 0.8)
that opt in to exact log-probs; one sampled request that does not. It writes vLLM's
returned tokens and log-probs next to mllmcal's records, the mllmcal_* metric counts of
this process, and (in-process only) the effect of labelled feedback. The asserting is done
by the test, in the main venv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STOP_MAX_TOKENS = 200
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tests/: checkpoints.py, servers.py
from servers import jsonl, vllm_model_args, wait_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("inproc", "mp"), required=True)
    args = vllm_model_args(ap)

    import checkpoints

    out = Path(args.out)
    records_path = out.with_suffix(".records.jsonl")
    records_path.unlink(missing_ok=True)
    os.environ["MLLMCAL_VLLM_RECORDS"] = str(records_path)
    os.environ["MLLMCAL_VLLM_FLUSH_INTERVAL"] = "0.1"
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if args.mode == "inproc" else "1"
    inproc = args.mode == "inproc"
    if inproc:
        os.environ["MLLMCAL_VLLM_ONLINE_TEMPERATURE"] = "1"

    from vllm import LLM, SamplingParams

    from mllmcal.integrations import vllm as mv

    llm = LLM(
        model=args.model, dtype="float32", max_model_len=256, enforce_eager=True,
        kv_cache_memory_bytes=64 << 20, max_num_seqs=4, max_num_batched_tokens=48,
        enable_prefix_caching=False, seed=0,
        logits_processors=["mllmcal.integrations.vllm:CalibratedLogitsProcessor"],
    )
    words = checkpoints.VLLM_WORDS
    prompts, params, kinds = [], [], []

    def add(n_prompt: int, kind: str, **kw) -> None:
        start = 7 * len(prompts)
        prompts.append(" ".join(words[(start + i) % len(words)] for i in range(n_prompt)))
        rid = f"{args.mode}-{kind}-{len(prompts)}"
        extra = {"mllmcal_id": rid, **kw.pop("extra", {})}
        params.append(SamplingParams(logprobs=1, ignore_eos=True, extra_args=extra, **kw))
        kinds.append(kind)

    for n_prompt, n_new in ((3, 5), (1, 9), (12, 2), (6, 1), (20, 7), (2, 12)):
        add(n_prompt, "greedy", max_tokens=n_new, temperature=0.0,
            extra={"mllmcal_feedback": True})
    # 100 prompt tokens with a 48-token step budget: prefilled over three steps, two of
    # which produce no token.
    add(100, "chunked", max_tokens=4, temperature=0.0)
    for i, n_new in enumerate((8, 5, 11)):
        add(4 + i, "sampled", max_tokens=n_new, temperature=0.8, seed=100 + i,
            extra={"mllmcal_logprobs": True})
    add(5, "sampled_no_optin", max_tokens=10, temperature=1.5, seed=7)
    # Ended by a stop *string*: the worker cannot see that from the tokens, so its record is
    # written when the request is found gone for good: at flush/shutdown here.
    probe = llm.generate([prompts[0]], [SamplingParams(max_tokens=5, temperature=0.0)],
                         use_tqdm=False)[0].outputs[0]
    stop_word = llm.get_tokenizer().decode([probe.token_ids[2]]).strip()
    # max_tokens far past the stop: with the engine in its own process, the stop is seen by
    # the front end and the abort reaches the engine a few steps later; it must not be able
    # to reach max_tokens first (the test still accepts that outcome, as "length").
    add(3, "stop_string", max_tokens=STOP_MAX_TOKENS, temperature=0.0, stop=[stop_word])
    prompts[-1] = prompts[0]

    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    requests = []
    for o, p, kind in zip(outs, params, kinds, strict=True):
        c = o.outputs[0]
        requests.append({
            "id": p.extra_args["mllmcal_id"],
            "kind": kind,
            "max_tokens": p.max_tokens,
            "token_ids": list(c.token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)],
            "top1": [max(lp.values(), key=lambda x: x.logprob).logprob for lp in c.logprobs],
        })
    ids = {r["id"] for r in requests}

    result: dict = {"mode": args.mode, "requests": requests, "generate_s": gen_s}
    if inproc:
        # Records of requests that ended by max_tokens are written by the drain thread
        # without any flush; wait for them, then check flush() has nothing left to do.
        written = wait_records(records_path, ids, 10, every=0.05)
        result["records_before_flush"] = sorted({r["id"] for r in written})
        result["flushed"] = mv.flush()
        from prometheus_client import REGISTRY

        result["metric_confidence_count"] = REGISTRY.get_sample_value(
            "mllmcal_token_confidence_count")
        result["metric_entropy_count"] = REGISTRY.get_sample_value("mllmcal_token_entropy_count")
        result["metric_requests"] = REGISTRY.get_sample_value("mllmcal_requests_total")
        result["feedback"] = _feedback_checks(mv, requests)
        del llm
    else:
        stop_id = next(r["id"] for r in requests if r["kind"] == "stop_string")
        before = wait_records(records_path, ids - {stop_id}, 30, every=0.05)
        result["records_before_shutdown"] = sorted({r["id"] for r in before})
        # Shutting the engine down (SIGTERM to its process) writes the open record.
        del llm
        wait_records(records_path, ids, 20, every=0.05)
    result["records"] = jsonl(records_path)
    out.write_text(json.dumps(result))


def _feedback_checks(mv, requests) -> dict:
    """Labelled feedback on the greedy requests' first token, with a label that is never
    the model's choice: the model looks over-confident, so online temperature must rise
    above 1 and the calibration state must count every item as wrong."""
    from prometheus_client import REGISTRY

    (tracker,) = mv.trackers()
    greedy = [r for r in requests if r["kind"] == "greedy"]
    for r in greedy:
        first = r["token_ids"][0]
        mv.feedback(r["id"], label=(first + 1) % 200 + 4)
    # One correctness-only item for a request that kept no row.
    chunked = next(r for r in requests if r["kind"] == "chunked")
    mv.feedback(chunked["id"], correct=True)
    mv.flush()
    return {
        "n_items": len(greedy) + 1,
        "n_feedback": tracker.n_feedback,
        "state_count": tracker.state.count,
        "state_accuracy": tracker.state.accuracy(),
        "state_ece": tracker.state.ece("l1"),
        "temperature": tracker.temperature,
        "gauge_temperature": REGISTRY.get_sample_value("mllmcal_temperature"),
        "gauge_ece": REGISTRY.get_sample_value("mllmcal_ece"),
        "gauge_accuracy": REGISTRY.get_sample_value("mllmcal_accuracy"),
        "counter_feedback": REGISTRY.get_sample_value("mllmcal_feedback_total"),
    }


if __name__ == "__main__":
    main()
