"""Loading routes, durable records and feedback files on the real vLLM CPU engine.

Run by tests/test_integration_vllm.py with .venv-vllm's Python, with a site folder on
PYTHONPATH that registers mllmcal's ``vllm.logits_processors`` entry point the way an
installed package does (a dist-info folder with entry_points.txt):

    python tests/vllm/loading_checks.py --model DIR --out result.json

Engine 1 (in-process) has the entry point AND ``logits_processors=[...]`` naming the
processor: one active instance must count each token and write each record once. Its
records path is in a folder that does not exist yet (created mid-run: the records must
then appear, once each, and the failed writes be counted); its feedback file is truncated
and then rotated (each new line must still be applied). Engine 2, in the same process,
has only the entry point and no MLLMCAL_VLLM: the processor must stay inert. Engine 3
enables it with ``additional_config={"mllmcal": {...}}``. It writes what it saw; the test
asserts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tests/: checkpoints.py, servers.py
from servers import jsonl, vllm_model_args, wait_for, wait_records  # noqa: E402

FQCN = "mllmcal.integrations.vllm:CalibratedLogitsProcessor"


def _sample(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


def main() -> None:
    args = vllm_model_args(argparse.ArgumentParser())

    import checkpoints

    out = Path(args.out)
    work = out.parent / "loading"
    work.mkdir(exist_ok=True)
    records = work / "later" / "records.jsonl"  # its folder does not exist yet
    fb = work / "feedback.jsonl"
    fb.write_text("")
    os.environ.update(MLLMCAL_VLLM_RECORDS=str(records), MLLMCAL_VLLM_FEEDBACK=str(fb),
                      MLLMCAL_VLLM_FLUSH_INTERVAL="0.05", TORCHDYNAMO_DISABLE="1",
                      VLLM_ENABLE_V1_MULTIPROCESSING="0")
    os.environ.pop("MLLMCAL_VLLM", None)

    from importlib.metadata import entry_points

    from vllm import LLM, SamplingParams

    from mllmcal.integrations import vllm as mv

    res: dict = {"entry_points": [e.value for e in entry_points(group="vllm.logits_processors")]}
    engine_kw = dict(model=args.model, dtype="float32", max_model_len=128, enforce_eager=True,
                     kv_cache_memory_bytes=32 << 20, max_num_seqs=4, seed=0)
    words = checkpoints.VLLM_WORDS
    prompts = [" ".join(words[(5 * i + j) % len(words)] for j in range(3 + i)) for i in range(3)]

    def generate(llm, tag: str, n_new=(4, 6, 3)) -> list[dict]:
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                 extra_args={"mllmcal_id": f"{tag}-{i}"})
                  for i, n in enumerate(n_new)]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [{"id": p.extra_args["mllmcal_id"], "token_ids": list(o.outputs[0].token_ids)}
                for p, o in zip(params, outs, strict=True)]

    # ---- engine 1: entry point + logits_processors naming the same class
    t0 = len(mv.trackers())
    llm = LLM(**engine_kw, logits_processors=[FQCN])
    reqs = generate(llm, "e1")
    ids = {r["id"] for r in reqs}
    n_tokens = sum(len(r["token_ids"]) for r in reqs)
    # Every request has ended; the drain thread tries to write and cannot (no folder).
    wait_for(lambda: _sample("mllmcal_requests_total") >= len(reqs), 10, every=0.05)
    time.sleep(0.3)
    res["e1"] = {
        "requests": reqs,
        "n_tokens": n_tokens,
        "active_trackers": len(mv.trackers()) - t0,
        "written_before_mkdir": records.exists(),
        "write_errors_before_mkdir": _sample("mllmcal_records_write_errors_total"),
    }
    records.parent.mkdir()
    wait_records(records, ids, 10, every=0.05)
    time.sleep(0.3)  # a double write would show by now
    res["e1"]["records"] = jsonl(records)
    res["e1"]["confidence_count"] = _sample("mllmcal_token_confidence_count")
    res["e1"]["requests_total"] = _sample("mllmcal_requests_total")
    res["e1"]["write_errors"] = _sample("mllmcal_records_write_errors_total")

    # Feedback through the file: one line, then the file truncated and one shorter line,
    # then the file rotated (moved away, recreated) with one more line.
    def applied() -> int:
        return int(_sample("mllmcal_feedback_total"))

    fb.write_text(json.dumps({"id": reqs[0]["id"], "correct": True, "note": "x" * 200}) + "\n")
    seen = [wait_for(lambda: applied() >= 1, 10, every=0.05) and applied()]
    fb.write_text(json.dumps({"id": reqs[1]["id"], "correct": False}) + "\n")  # truncates
    seen.append(wait_for(lambda: applied() >= 2, 10, every=0.05) and applied())
    fb.rename(work / "feedback.jsonl.1")
    fb.write_text(json.dumps({"id": reqs[2]["id"], "correct": True}) + "\n")
    seen.append(wait_for(lambda: applied() >= 3, 10, every=0.05) and applied())
    # A last line without its newline waits for it.
    with open(fb, "a") as f:
        f.write(json.dumps({"id": reqs[0]["id"], "correct": True}))
    time.sleep(0.3)
    seen.append(applied())
    res["feedback_applied"] = seen
    del llm
    gc.collect()

    # ---- engine 2: the entry point alone, no MLLMCAL_VLLM: inert
    before = {k: _sample(k) for k in ("mllmcal_token_confidence_count", "mllmcal_requests_total")}
    n_lines = len(jsonl(records))
    t0 = len(mv.trackers())
    llm = LLM(**engine_kw)
    reqs = generate(llm, "e2")
    time.sleep(0.5)
    res["e2"] = {
        "active_trackers": len(mv.trackers()) - t0,
        "records_added": len(jsonl(records)) - n_lines,
        "metrics_moved": {k: _sample(k) - v for k, v in before.items()},
    }
    del llm
    gc.collect()

    # ---- engine 3: the entry point, enabled by additional_config
    before = _sample("mllmcal_token_confidence_count")
    t0 = len(mv.trackers())
    llm = LLM(**engine_kw, additional_config={"mllmcal": {"flush_interval": 0.05}})
    reqs = generate(llm, "e3")
    n3 = sum(len(r["token_ids"]) for r in reqs)
    wait_for(lambda: _sample("mllmcal_token_confidence_count") - before >= n3, 10, every=0.05)
    time.sleep(0.3)
    res["e3"] = {"n_tokens": n3, "active_trackers": len(mv.trackers()) - t0,
                 "confidence_count": _sample("mllmcal_token_confidence_count") - before,
                 "records": [r for r in jsonl(records) if r["id"].startswith("e3-")]}

    # Stopping on low confidence: a threshold above any confidence stops every request
    # right after its first window; a threshold of 0 never does.
    window = 3
    stop_params = [
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=1, extra_args={
            "mllmcal_id": "stop-greedy", "mllmcal_stop_below": 1.01,
            "mllmcal_stop_window": window}),
        SamplingParams(max_tokens=12, temperature=0.9, seed=3, logprobs=1, extra_args={
            "mllmcal_id": "stop-sampled", "mllmcal_stop_below": 1.01,
            "mllmcal_stop_window": window, "mllmcal_logprobs": True}),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[7],
                       logprobs=1, extra_args={"mllmcal_id": "stop-ignore-eos",
                                               "mllmcal_stop_below": 1.01,
                                               "mllmcal_stop_window": window}),
        SamplingParams(max_tokens=6, temperature=0.0, extra_args={
            "mllmcal_id": "stop-never", "mllmcal_stop_below": 0.0}),
    ]
    outs = llm.generate(prompts[:1] * len(stop_params), stop_params, use_tqdm=False)
    stop_ids = {p.extra_args["mllmcal_id"] for p in stop_params}
    wait_records(records, stop_ids, 10, every=0.05)
    res["stop"] = {
        "window": window,
        "eos": llm.get_tokenizer().eos_token_id,
        "requests": [{
            "id": p.extra_args["mllmcal_id"], "token_ids": list(o.outputs[0].token_ids),
            "finish_reason": o.outputs[0].finish_reason,
            "logprobs": ([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                         o.outputs[0].token_ids, strict=True)]
                         if o.outputs[0].logprobs else None)}
            for p, o in zip(stop_params, outs, strict=True)],
        "records": [r for r in jsonl(records) if r["id"] in stop_ids],
    }

    # Offline response statistics: with_stats() + response_stats(), aligned with the tokens.
    base = [SamplingParams(max_tokens=n, temperature=t, seed=9, logprobs=1, ignore_eos=True,
                           extra_args={"mllmcal_id": "same"}) for n, t in ((5, 0.0), (3, 0.0),
                                                                           (6, 0.8))]
    ps = [mv.with_stats(p) for p in base]
    outs = llm.generate(prompts, ps, use_tqdm=False)
    stats = mv.response_stats(outs, ps)
    res["offline"] = [{
        "token_ids": list(o.outputs[0].token_ids),
        "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                    o.outputs[0].token_ids, strict=True)],
        "greedy": p.temperature == 0.0, "stats": st} for o, p, st in zip(outs, ps, stats,
                                                                         strict=True)]
    out.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
