"""Throughput of the vLLM CPU engine with and without mllmcal's logits processor.

    .venv-vllm/bin/python bench/bench_vllm.py [--rounds 3] [--out bench/results/vllm_cpu.json]

(Run with another Python, it re-executes itself with .venv-vllm's.) One process builds a
Llama-shaped model from a config (32k vocabulary, so the per-step logits are realistic in
width) and starts two in-process engines on it: one without processors and one with
``mllmcal.integrations.vllm:CalibratedLogitsProcessor`` (records to a file, Prometheus
metrics on). It then times, in interleaved rounds so that load drift on the machine hits
all three alike, greedy generation of the same prompts:

* ``none``: no processor, no logprobs;
* ``installed``: mllmcal installed (its ``vllm.logits_processors`` entry point registered,
  as ``pip install`` does) but not enabled: the processor is loaded and inert;
* ``mllmcal``: the processor, observing (confidence, entropy and exact log-prob of every
  token, records, metrics);
* ``with_stats``: the processor, with every request's statistics returned to the caller
  (``with_stats`` / ``response_stats``);
* ``vllm_logprobs``: no processor, ``logprobs=1`` (vLLM's own per-token log-probs).

Two rates per run: generated tokens over the wall time of ``LLM.generate``, and over the
process's CPU time in it (``time.process_time``: all threads of this process, the engine
and mllmcal's drain thread included). On a shared machine the wall time swings with other
processes' load; the CPU time counts only this process's work, so its ratio is the cleaner
estimate of the processor's cost. Even CPU time swings under heavy load (spinning
threads). Cases run in a fresh random order each round. The headline is the paired ratio:
each round's rate over the same round's ``none``, as a geometric mean over the rounds with
its 95% interval; ``installed`` runs no mllmcal code, so its interval shows what the bench
can resolve on the machine (±3-4% with 31 rounds on the 2-vCPU CI box). The best round of
each case and the medians are printed too. The JSON holds every round.

The processor's cost per step is one pass over the ``[B, V]`` logits, whatever the model;
the engine's cost grows with the model. The default model (hidden 256, 4 layers, 32k
vocabulary: the logits are a large part of its step) is therefore the worst case; run
``--hidden 1024 --layers 8`` for a model whose step is dominated by its layers, as real
checkpoints are, or ``--vocab 151936 --hidden 896 --layers 24 --max-tokens 16 --rounds 13``
for the shape of Qwen2.5-0.5B (the model of vLLM's own logprobs measurements; the MLP is
narrower). Results: ``bench/results/vllm_cpu.json`` (default),
``bench/results/vllm_cpu_h1024_l8.json`` and ``bench/results/vllm_cpu_qwen05b_shape.json``.

A third estimate does not depend on the machine being quiet: in the ``mllmcal`` case the
processor's methods (``apply``, ``update_state`` on the engine thread, ``drain`` on its own
thread) are timed with ``time.thread_time`` (CPU time of the calling thread), and their sum
is reported as a share of the process's CPU time over the same rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _vllm_venv import run_with_vllm

ROOT = Path(__file__).resolve().parents[1]


def paired_ratio(rates: list[float], base: list[float]) -> dict[str, object]:
    """Geometric mean over rounds of ``rates[i] / base[i]`` (both measured in round i, so
    that drift in the machine's speed between rounds cancels), with a normal 95% interval
    on the log scale."""
    logs = [math.log(a / b) for a, b in zip(rates, base, strict=True)]
    mean = statistics.fmean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.inf
    return {"gmean": math.exp(mean), "ci95": [math.exp(mean - half), math.exp(mean + half)],
            "rounds": len(logs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_cpu.json"))
    args = ap.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    work = Path(tempfile.mkdtemp(prefix="mllmcal-bench-vllm-"))
    os.environ["MLLMCAL_VLLM_RECORDS"] = str(work / "records.jsonl")
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import checkpoints
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    from mllmcal.integrations import vllm as mv
    from mllmcal.integrations.vllm import V1CalibratedLogitsProcessor

    spent = {"engine_thread": 0.0, "drain_thread": 0.0}

    class TimedProcessor(V1CalibratedLogitsProcessor):
        """mllmcal's processor with its own CPU time counted (a benchmark probe); the CPU
        engine runs the V1 model runner."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            drain = self.tracker.drain

            def timed_drain(final=False):
                t0 = time.thread_time()
                drain(final)
                spent["drain_thread"] += time.thread_time() - t0

            self.tracker.drain = timed_drain

        def apply(self, logits):
            t0 = time.thread_time()
            out = super().apply(logits)
            spent["engine_thread"] += time.thread_time() - t0
            return out

        def update_state(self, batch_update):
            t0 = time.thread_time()
            super().update_state(batch_update)
            spent["engine_thread"] += time.thread_time() - t0

    model = checkpoints.build_vllm_llama(work / "model", n_words=args.vocab - 4, hidden=args.hidden,
                             layers=args.layers)
    common = dict(model=str(model), dtype="float32", max_model_len=512, enforce_eager=True,
                  kv_cache_memory_bytes=256 << 20, max_num_seqs=args.prompts, seed=0)
    engines = {
        "none": LLM(**common),
        "mllmcal": LLM(**common, logits_processors=[TimedProcessor],
                       additional_config={"mllmcal": {}}),  # a subclass defined here: enable it
    }
    # Installed, not enabled: the entry point as an installed package registers it (a
    # dist-info folder on sys.path; vLLM reads entry points at each engine's start, so the
    # two engines above do not see it).
    site = work / "site"
    (site / "mllmcal-0.0.dist-info").mkdir(parents=True)
    (site / "mllmcal-0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mllmcal\nVersion: 0.0\n")
    (site / "mllmcal-0.0.dist-info" / "entry_points.txt").write_text(
        "[vllm.logits_processors]\nmllmcal = mllmcal.integrations.vllm:CalibratedLogitsProcessor\n")
    sys.path.append(str(site))
    os.environ.pop("MLLMCAL_VLLM", None)
    engines["installed"] = LLM(**common)
    n_active = len(mv.trackers())
    assert n_active == 1, f"the installed-not-enabled engine has an active processor ({n_active})"
    words = [f"w{i}" for i in range(args.vocab - 4)]
    prompts = [" ".join(words[(97 * i + 13 * j) % len(words)] for j in range(16 + 3 * i))
               for i in range(args.prompts)]

    def params(logprobs):
        return [SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                               logprobs=logprobs, extra_args={"mllmcal_id": f"b{i}"})
                for i in range(len(prompts))]

    cases = {
        "none": (engines["none"], params(None)),
        "installed": (engines["installed"], params(None)),
        "mllmcal": (engines["mllmcal"], params(None)),
        "with_stats": (engines["mllmcal"], params(None)),
        "vllm_logprobs": (engines["none"], params(1)),
    }

    def generate(name, eng, ps, n=None):
        if name != "with_stats":
            return eng.generate(prompts[:n], ps[:n], use_tqdm=False)
        ps = [mv.with_stats(p) for p in ps[:n]]
        outs = eng.generate(prompts[:n], ps, use_tqdm=False)
        stats = mv.response_stats(outs, ps)
        assert all(st is not None and "error" not in st for st in stats), stats
        return outs

    for name, (eng, ps) in cases.items():  # warm-up: first-call allocations, thread pools
        generate(name, eng, ps, 2)
    runs: dict[str, list[float]] = {k: [] for k in cases}
    cpu_runs: dict[str, list[float]] = {k: [] for k in cases}
    spent.update(engine_thread=0.0, drain_thread=0.0)
    mllmcal_cpu = 0.0
    names = list(cases)
    order = random.Random(0)
    for _ in range(args.rounds):
        # A fresh order each round: with a fixed one, the case that opens a round (after
        # the previous round's last case and the prints) ran 0-9% slower than the others,
        # measured as "installed" (an inert processor) beating "none" by up to 1.09.
        order.shuffle(names)
        for name in names:
            eng, ps = cases[name]
            t0, c0 = time.perf_counter(), time.process_time()
            outs = generate(name, eng, ps)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            runs[name].append(n / dt)
            cpu_runs[name].append(n / dc)
            if name in ("mllmcal", "with_stats"):
                mllmcal_cpu += dc
            print(f"{name:14s} {n / dt:9.1f} tok/s wall {n / dc:9.1f} tok/CPU-s  "
                  f"({n} tokens, {dt:.2f} s wall, {dc:.2f} s CPU)", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_runs.items()}
    best = {k: max(v) for k, v in runs.items()}
    cpu_best = {k: max(v) for k, v in cpu_runs.items()}

    paired = {k: paired_ratio(runs[k], runs["none"]) for k in runs}
    cpu_paired = {k: paired_ratio(cpu_runs[k], cpu_runs["none"]) for k in cpu_runs}

    time.sleep(2 * mv.trackers()[0].config.flush_interval)  # let the last drain run
    share = (spent["engine_thread"] + spent["drain_thread"]) / mllmcal_cpu
    n_records = mv.flush()
    result = {
        "what": "vLLM CPU engine generate throughput (tokens/s), greedy, in-process engine",
        "command": "python bench/bench_vllm.py " + " ".join(sys.argv[1:]),
        "vllm": vllm.__version__, "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads()},
        "model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers},
        "prompts": args.prompts, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "load_average_at_end": os.getloadavg(),
        "tokens_per_s": runs, "best_tokens_per_s": best,
        "best_ratio_to_none": {k: best[k] / best["none"] for k in best},
        "best_tokens_per_cpu_s": cpu_best,
        "best_cpu_ratio_to_none": {k: cpu_best[k] / cpu_best["none"] for k in cpu_best},
        "median_tokens_per_s": med,
        "ratio_to_none": {k: med[k] / med["none"] for k in med},
        "tokens_per_cpu_s": cpu_runs, "median_tokens_per_cpu_s": cpu_med,
        "cpu_ratio_to_none": {k: cpu_med[k] / cpu_med["none"] for k in cpu_med},
        "paired_ratio_to_none": paired, "paired_cpu_ratio_to_none": cpu_paired,
        "records_written_at_end": n_records,
        "processor_cpu_s": spent, "process_cpu_s_mllmcal_case": mllmcal_cpu,
        "processor_cpu_share": share,
    }
    del engines, cases
    shutil.rmtree(work, ignore_errors=True)  # the model and the records
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| case | best tokens/s | vs none | best tokens/CPU-s | vs none "
          "| median tokens/s | vs none |\n| --- | --- | --- | --- | --- | --- | --- |")
    for k in med:
        print(f"| {k} | {best[k]:.1f} | {best[k] / best['none']:.3f} | {cpu_best[k]:.1f} | "
              f"{cpu_best[k] / cpu_best['none']:.3f} | {med[k]:.1f} | "
              f"{med[k] / med['none']:.3f} |")
    print("\nPaired: each round's rate over the same round's `none`, geometric mean over the "
          "rounds with its 95% interval (`installed` runs no mllmcal code: its interval "
          "shows the bench's own error)\n\n| case | tokens/s vs none | tokens/CPU-s vs none |"
          "\n| --- | --- | --- |")
    for k in med:
        if k != "none":
            w, c = paired[k], cpu_paired[k]
            print(f"| {k} | {w['gmean']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] | "
                  f"{c['gmean']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] |")
    print(f"\nmllmcal's processor: {spent['engine_thread']:.3f} s on the engine thread + "
          f"{spent['drain_thread']:.3f} s on its drain thread = {100 * share:.2f}% of the "
          f"process's {mllmcal_cpu:.2f} CPU-s in the mllmcal and with_stats rounds")


if __name__ == "__main__":
    run_with_vllm(main)
